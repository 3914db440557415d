"""Class-prior images: generated once per (model, prompt, seed, count, settings) and shared across concepts."""

import json

from personalize.method_spec import ClassPriorSpec
from personalize.models import load_components
from personalize.priors import class_prior_images


def test_concepts_of_one_class_share_one_generated_set(tiny_model, tmp_path):
    comps = load_components(str(tiny_model))
    spec = ClassPriorSpec(num_images=3, inference_steps=2)
    first, folder = class_prior_images(comps, spec, ["dog"], seed=0, resolution=64, cache_root=tmp_path, progress=False)
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    second, again = class_prior_images(comps, spec, ["dog"], seed=0, resolution=64, cache_root=tmp_path, progress=False)
    assert again == folder and (folder / "manifest.json").stat().st_mtime_ns == stamp
    assert [c for _, c in first] == ["a photo of a dog"] * 3
    other, cat_folder = class_prior_images(comps, spec, ["cat"], seed=0, resolution=64, cache_root=tmp_path, progress=False)
    assert cat_folder != folder
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([folder.name, cat_folder.name])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert len(manifest["images"]) == 3 and first[0][0].size == (64, 64)


def test_several_subjects_make_one_joint_prompt(tiny_model, tmp_path):
    comps = load_components(str(tiny_model))
    spec = ClassPriorSpec(prompt="photo of {classes}", num_images=1, inference_steps=1)
    pairs, _ = class_prior_images(comps, spec, ["cat", "dog"], 0, 64, tmp_path, progress=False)
    assert pairs[0][1] == "photo of a cat and a dog"


def test_a_folder_of_real_images_with_captions(tmp_path):
    from PIL import Image

    (tmp_path / "real").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "real" / "a.png")
    (tmp_path / "real" / "a.txt").write_text("a dog on a sofa\n")
    Image.new("RGB", (64, 64)).save(tmp_path / "real" / "b.png")
    pairs, _ = class_prior_images(None, ClassPriorSpec(folder=str(tmp_path / "real")), ["dog"], 0, 64)
    assert [c for _, c in pairs] == ["a dog on a sofa", "a photo of a dog"]
