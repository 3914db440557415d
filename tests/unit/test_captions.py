"""Per-photo caption files: IMAGE.txt beside a photo replaces the method's training prompt for that photo's variants,
with {placeholder} and {class} filled; a caption that cannot be used fails its concept with the file and the fix."""

import pytest
import torch
from PIL import Image

from personalize.data import Batcher, LatentBank
from personalize.errors import ConceptError
from personalize.images import load_concept_captions
from personalize.run_context import prepare_run
from tests.conftest import draw_concept


class Fill:
    strings, super_categories = ["<blob>"], ["toy"]

    def fill(self, template: str) -> str:
        return template.replace("{}", "{placeholder}").format(placeholder="<blob>", super_category="toy", subjects="")


def bank(n: int) -> LatentBank:
    return LatentBank(torch.zeros(n, 4, 2, 2), torch.zeros(n, 4, 2, 2), [""] * n, None, 1.0)


def test_captions_are_read_in_image_order_and_missing_ones_are_none(tmp_path):
    folder = draw_concept(tmp_path / "blob", n=3)
    (folder / "0.txt").write_text("a {placeholder} {class} on a beach\n")
    (folder / "2.txt").write_text("{placeholder} in the snow")
    assert load_concept_captions("blob", folder) == ["a {placeholder} {class} on a beach", None, "{placeholder} in the snow"]


@pytest.mark.parametrize(("files", "words"), [
    ({"0.txt": "a toy on a beach"}, ["0.txt", "'a toy on a beach'", "{placeholder}"]),
    ({"0.txt": "a {placeholder} in {colour}"}, ["0.txt", "no other braces"]),
    ({"7.txt": "a {placeholder}"}, ["captions without an image: ['7.txt']", "photo.png -> photo.txt"]),
])
def test_a_caption_that_cannot_be_used_names_its_file_and_the_fix(tmp_path, files, words):
    folder = draw_concept(tmp_path / "blob", n=2)
    for name, text in files.items():
        (folder / name).write_text(text)
    with pytest.raises(ConceptError) as error:
        load_concept_captions("blob", folder)
    assert "concept 'blob'" in str(error.value)
    for word in words:
        assert word in str(error.value)


def test_a_photos_caption_replaces_the_template_for_its_variants_only():
    captions = ["a {placeholder} {class} on a beach"] * 2 + [None] * 2  # two photos, two variants each
    batcher = Batcher(bank(4), Fill(), ["a photo of {placeholder} {super_category}"], captions=captions)
    prompts = {i: batcher.prompt(i, "a photo of {placeholder} {super_category}") for i in range(4)}
    assert prompts == {0: "a <blob> toy on a beach", 1: "a <blob> toy on a beach",
                       2: "a photo of <blob> toy", 3: "a photo of <blob> toy"}
    drawn = batcher.draw(64, torch.Generator().manual_seed(0), use_prior=False).prompts
    assert set(drawn) == {"a <blob> toy on a beach", "a photo of <blob> toy"}


def test_without_captions_the_draws_are_what_they_were(tmp_path):
    """No caption files: the same prompts from the same generator (published recipes stay bit-identical)."""
    plain = Batcher(bank(4), Fill(), ["a {placeholder}", "the {placeholder} {super_category}"])
    captioned = Batcher(bank(4), Fill(), ["a {placeholder}", "the {placeholder} {super_category}"], captions=[None] * 4)
    a = plain.draw(8, torch.Generator().manual_seed(1), use_prior=False)
    b = captioned.draw(8, torch.Generator().manual_seed(1), use_prior=False)
    assert a.prompts == b.prompts and torch.equal(a.latents, b.latents)


def test_a_caption_file_reaches_the_runs_training_prompts(spec_for, concept_dir):
    (concept_dir / "0.txt").write_text("a {placeholder} {class} riding a bike")
    context = prepare_run(spec_for("dreambooth"), progress=False)
    drawn = context.batcher.draw(32, torch.Generator().manual_seed(0), use_prior=False).prompts
    assert "a sks toy riding a bike" in drawn and "a photo of sks toy" in drawn


def test_a_method_that_locates_the_class_token_needs_it_after_the_placeholder_in_captions(spec_for, concept_dir):
    (concept_dir / "0.txt").write_text("{placeholder} riding a bike")
    with pytest.raises(ConceptError, match="has no class word right after"):
        prepare_run(spec_for("attndreambooth"), progress=False)


@pytest.mark.parametrize("caption, details", [
    ("a purple {placeholder} {class} on a bike", ["purple"]),
    ("a {placeholder} striped {class}", ["striped"]),
    ("a {placeholder} {class} with yellow stripes on the grass", ["yellow", "stripes"]),
    ("a {placeholder} {class} on the green grass", []),  # the scene's colour, not the subject's
    ("a photo of a {placeholder} {class} in a red box", []),
    ("{placeholder} {class}", []),
])
def test_the_words_a_caption_spends_on_the_subjects_look(caption, details):
    from personalize.images import appearance_words

    assert appearance_words(caption) == details


def test_a_caption_describing_the_subjects_look_is_a_warning_naming_file_and_words(tmp_path, caplog):
    import logging

    from personalize.images import load_concept_captions

    folder = tmp_path / "c"
    folder.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (64, 64)).save(folder / f"{name}.png")
    (folder / "a.txt").write_text("a yellow {placeholder} {class} on a bike")
    (folder / "b.txt").write_text("a {placeholder} {class} on a bike")
    with caplog.at_level(logging.WARNING, logger="personalize.images"):
        captions = load_concept_captions("duck", folder)
    assert captions == ["a yellow {placeholder} {class} on a bike", "a {placeholder} {class} on a bike"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'duck'" in warnings[0] and "a.txt" in warnings[0] and "(yellow)" in warnings[0]
