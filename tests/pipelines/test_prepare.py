"""Prepare refuses, with the tokenizer only, a run whose method needs a one-token class it lacks, and encodes only
the instance latents a batch lacks: one encoding per bank (methods that augment alike share it), nothing for a cached
bank or a finished run, so a resubmitted batch starts no encoding actor."""

from pathlib import Path

import pandas as pd

from personalize.data import LatentBank, cached_bank_path
from personalize.run_context import instance_bank_key
from personalize.run_folder import write_done
from pipelines.prepare import LatentEncoder, latents_to_encode, refuse_runs
from tests.conftest import draw_concept, quick_spec


def specs(tiny_model, images, out, methods, concept_id="blob", super_category="toy"):
    concept = {"id": concept_id, "images": str(images), "super_category": super_category}
    return [quick_spec(m, tiny_model, images, out, concept=concept, latent_cache_dir=str(out / "latents"))
            for m in methods]


def test_each_missing_bank_is_encoded_once_and_a_cached_one_never(tiny_model, tmp_path):
    images = draw_concept(tmp_path / "blob", n=2)
    runs = specs(tiny_model, images, tmp_path / "out", ["dreambooth", "rare_two_stage", "textual_inversion"])
    todo = latents_to_encode(runs, tiny_model)
    # dreambooth and rare_two_stage augment alike ("dreambooth"), textual inversion does not ("ti")
    assert sorted(s.method.augmentation for s in todo) == ["dreambooth", "ti"]

    LatentEncoder(str(tiny_model))(pd.DataFrame({"spec": [s.model_dump_json() for s in todo]}))
    for spec in todo:
        bank = LatentBank.load(cached_bank_path(tmp_path / "out" / "latents", instance_bank_key(spec, tiny_model)))
        assert len(bank) == 2 * spec.latent_variants  # two photos, each in its variants
    assert latents_to_encode(runs, tiny_model) == []

    (images / "2.png").write_bytes((images / "0.png").read_bytes())  # a new photo: a new bank
    assert [s.method.name for s in latents_to_encode(runs[2:], tiny_model)] == ["textual_inversion"]


def test_a_finished_run_or_one_of_another_configuration_needs_no_latents(tiny_model, tmp_path):
    images = draw_concept(tmp_path / "blob", n=2)
    finished, other = specs(tiny_model, images, tmp_path / "out", ["textual_inversion", "attndreambooth"])
    for spec in (finished, other):
        spec.run_dir.mkdir(parents=True)
    write_done(finished.run_dir, finished.config_hash(), [])
    assert [s.method.name for s in latents_to_encode([finished, other], tiny_model)] == ["attndreambooth"]
    write_done(other.run_dir, "another-configuration", [])  # it fails without training: nothing to encode
    assert latents_to_encode([finished, other], tiny_model) == []


def test_a_class_of_several_tokens_refuses_only_the_methods_that_locate_the_class_token(tiny_model, tmp_path):
    images = draw_concept(tmp_path / "truck", n=2)
    methods = ["textual_inversion", "dreambooth", "attndreambooth", "core", "custom_diffusion"]
    runs = specs(tiny_model, images, tmp_path / "out", methods, "truck", "fire truck")
    refused = refuse_runs(runs, tiny_model)
    assert sorted(Path(r).name for r in refused) == ["attndreambooth", "core"]
    for reason in refused.values():
        assert "concept 'truck'" in reason and "'fire truck' is 2 CLIP tokens" in reason and "one-token word" in reason
    assert refuse_runs(specs(tiny_model, images, tmp_path / "one", methods, "truck", "truck"), tiny_model) == {}
