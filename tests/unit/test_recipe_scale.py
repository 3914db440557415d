"""Recipes scaled to a model: a model folder's recipe_scale.json multiplies learning rates and stage lengths by
kind of trainable; the effective numbers reach the resolved config and the method table; overrides stay absolute."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from personalize.cli import main
from personalize.config import load_method, resolve_runs
from personalize.errors import ConfigError
from personalize.run_settings import ExperimentConfig
from personalize.scaling import SCALE_FILE, RecipeScale, describe_scale, load_recipe_scale

WORLD_MODEL = Path(__file__).resolve().parents[2] / "models" / "microworld" / "model"


@pytest.mark.parametrize(("trainable", "expected"), [
    (["unet"], 20.0),
    (["unet.attn2"], 10.0),
    (["unet.attn2.kv", "placeholder"], 10.0),  # Custom Diffusion's stage scales as its widest part, attention
    (["placeholder"], 4.0),
    (["text_encoder"], 1.0),  # no entry: the paper's number
])
def test_a_stage_takes_the_scale_of_its_widest_trainable(trainable, expected):
    table = {"unet": 20.0, "unet.attn2": 10.0, "placeholder": 4.0}
    assert RecipeScale.factor(table, trainable) == expected


def test_the_most_specific_entry_wins():
    assert RecipeScale.factor({"unet": 20.0, "unet.attn2": 10.0, "unet.attn2.kv": 3.0}, ["unet.attn2.kv"]) == 3.0
    assert RecipeScale.factor({"unet": 20.0}, ["unet.attn2.kv"]) == 20.0  # a key covers the selectors below it


def write_scale(folder: Path, payload) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SCALE_FILE).write_text(json.dumps(payload) if not isinstance(payload, str) else payload)
    return folder


def test_scaled_method_numbers_and_recorded_factors(tmp_path):
    scale = load_recipe_scale(str(write_scale(tmp_path, {"lr": {"unet": 20, "unet.attn2": 10, "placeholder": 4},
                                                         "steps": {"unet": 2}})))
    adb = load_method("attndreambooth", scale=scale)
    paper = load_method("attndreambooth")
    got = [(s.lr, s.steps, s.model_lr_scale, s.model_steps_scale) for s in adb.stages]
    assert got == [
        (pytest.approx(paper.stages[0].lr * 4), paper.stages[0].steps, 4.0, 1.0),
        (pytest.approx(paper.stages[1].lr * 10), paper.stages[1].steps * 2, 10.0, 2.0),  # 'unet' covers attention
        (pytest.approx(paper.stages[2].lr * 20), paper.stages[2].steps * 2, 20.0, 2.0),
    ]
    core = load_method("core", scale=scale)
    assert core.test_time.lr == pytest.approx(load_method("core").test_time.lr * 4)


def test_overrides_name_the_effective_value(tmp_path):
    scale = load_recipe_scale(str(write_scale(tmp_path, {"lr": {"unet": 20}})))
    method = load_method("dreambooth", {"stages.finetune.lr": 3e-5}, scale)
    assert method.stages[0].lr == 3e-5


@pytest.mark.parametrize(("payload", "message"), [
    ("{not json", "not valid JSON"),
    ({"lr": {"unet.everything": 2}}, "unknown trainable selector"),
    ({"lr": {"unet": 0}}, "must be > 0"),
    ({"learning_rate": {"unet": 2}}, "learning_rate"),
])
def test_a_bad_scale_file_is_a_clear_error(tmp_path, payload, message):
    write_scale(tmp_path, payload)
    with pytest.raises(ConfigError) as e:
        load_recipe_scale(str(tmp_path))
    assert SCALE_FILE in str(e.value) and message in str(e.value)


def test_hub_ids_and_plain_folders_have_no_scale(tmp_path):
    assert load_recipe_scale("runwayml/stable-diffusion-v1-5") is None
    assert load_recipe_scale(str(tmp_path)) is None


def test_resolved_runs_carry_the_world_models_effective_numbers(tmp_path, concept_dir):
    """The committed micro-world model declares its scale; every run on it is resolved with it."""
    scale = load_recipe_scale(str(WORLD_MODEL))
    assert scale is not None and scale.lr.get("unet", 1.0) > 1.0
    model = tmp_path / "model"
    shutil.copytree(WORLD_MODEL, model)
    experiment = ExperimentConfig(model=str(model), method="dreambooth", output_dir=str(tmp_path / "runs"),
                                  concepts=[{"id": "c", "images": str(concept_dir), "super_category": "star"}])
    spec = resolve_runs(experiment)[0]
    stage = spec.method.stages[0]
    assert stage.lr == pytest.approx(load_method("dreambooth").stages[0].lr * scale.lr["unet"])
    assert json.loads(spec.model_dump_json())["method"]["stages"][0]["model_lr_scale"] == scale.lr["unet"]


def test_methods_command_prints_the_scaled_numbers(capsys, tmp_path):
    write_scale(tmp_path, {"lr": {"unet": 20}})
    assert main(["methods", "--model", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "recipes scaled by its recipe_scale.json (lr x20 unet)" in out and "0.0001 (x20)" in out  # DreamBooth: 5e-6 x 20


def test_prompt_sets_speak_the_models_language(tmp_path):
    scale = load_recipe_scale(str(write_scale(tmp_path, {"prompt_sets": {"ti_object": "world_captions", "context": "world_context"}})))
    assert load_method("textual_inversion", scale=scale).prompt == "@world_captions"
    assert load_method("core", scale=scale).context_prompts == "world_context"
    assert load_method("dreambooth", scale=scale).prompt == load_method("dreambooth").prompt  # a plain template stays
    write_scale(tmp_path, {"prompt_sets": {"ti_object": "klingon"}})
    with pytest.raises(ConfigError, match="unknown prompt set 'klingon'"):
        load_recipe_scale(str(tmp_path))


def test_an_overridden_number_no_longer_records_a_scale_and_the_hash_ignores_the_record(tmp_path, concept_dir):
    scale = load_recipe_scale(str(write_scale(tmp_path / "m", {"lr": {"unet": 20, "unet.attn2": 10}, "steps": {"unet": 2}})))
    stage = load_method("dreambooth", {"stages.finetune.lr": 3e-5}, scale).stages[0]
    assert (stage.lr, stage.model_lr_scale, stage.model_steps_scale) == (3e-5, 1.0, 2.0)
    assert RecipeScale.factor(scale.lr, ["unet.attn2", "unet"]) == RecipeScale.factor(scale.lr, ["unet", "unet.attn2"]) == 20
    experiment = ExperimentConfig(model=str(tmp_path / "x"), method="dreambooth", output_dir=str(tmp_path / "runs"),
                                  concepts=[{"id": "c", "images": str(concept_dir), "super_category": "star"}])
    spec = resolve_runs(experiment)[0]
    recorded = spec.model_copy(update={"method": spec.method.model_copy(update={"stages": [
        spec.method.stages[0].model_copy(update={"model_lr_scale": 7.0})]})})
    assert recorded.config_hash() == spec.config_hash()  # a record of how a number came about is not hashed


def test_steps_scale_moves_warmup_and_a_norm_lock_given_in_steps(tmp_path):
    from personalize.scaling import scaled_lengths

    stage = {"steps": 300, "warmup_steps": 10, "embedding_norm_lock": {"start": 120, "end": 180}}
    assert scaled_lengths(stage, 2.0) == {"steps": 600, "warmup_steps": 20, "embedding_norm_lock": {"start": 240, "end": 360}}


def test_templates_and_augmentation_words_speak_the_models_grammar(tmp_path):
    """Custom Diffusion's "photo of a <new1> star" and its class prompt, said as the model's captions say them; its
    zoom words left out of the crops' prompts (the loss masks stay: the bank is the same)."""
    write_scale(tmp_path, {"prompts": {"photo of a {placeholder} {super_category}": "a photo of a {placeholder} {super_category}",
                                       "photo of a {super_category}": "a photo of a {super_category}"},
                           "augmentation_words": False})
    scale = load_recipe_scale(str(tmp_path))
    spoken, paper = load_method("custom_diffusion", scale=scale), load_method("custom_diffusion")
    assert (paper.prompt, paper.class_prior.prompt, paper.augmentation_words) == (
        "photo of a {placeholder} {super_category}", "photo of a {super_category}", True)
    assert (spoken.prompt, spoken.class_prior.prompt, spoken.augmentation_words) == (
        "a photo of a {placeholder} {super_category}", "a photo of a {super_category}", False)
    assert load_method("custom_diffusion", {"augmentation_words": True}, scale).augmentation_words  # an override wins
    assert load_method("disendiff", scale=scale).prompt == "photo of a {subjects}"  # a template it does not name stays
    dreambooth = load_method("dreambooth", scale=scale)  # its preset says no words: nothing to leave out
    assert dreambooth.augmentation_words and dreambooth.prompt == load_method("dreambooth").prompt
    assert "template 'photo of a {super_category}' -> 'a photo of a {super_category}'" in describe_scale(scale)
    assert "no words from an augmentation" in describe_scale(scale)
    write_scale(tmp_path, {"prompts": {"photo of a {placeholder} {super_category}": "a photo of a {placeholder}"}})
    with pytest.raises(ConfigError, match=r"fills \['placeholder'\], not \['placeholder', 'super_category'\]"):
        load_recipe_scale(str(tmp_path))
    write_scale(tmp_path, {"prompts": {"photo of a {placeholder": "a photo of a {placeholder}"}})
    with pytest.raises(ConfigError, match="a brace without its pair"):
        load_recipe_scale(str(tmp_path))


def test_the_world_models_grammar_reaches_custom_diffusion_and_leaves_other_runs_hashes_alone(tmp_path, concept_dir):
    world = load_recipe_scale(str(WORLD_MODEL))
    custom = load_method("custom_diffusion", scale=world)
    assert (custom.prompt, custom.class_prior.prompt, custom.augmentation_words) == (
        "a photo of a {placeholder} {super_category}", "a photo of a {super_category}", False)

    def hashes(scale: dict) -> dict[str, str]:
        write_scale(tmp_path / "model", scale)
        return {method: resolve_runs(ExperimentConfig(
            model=str(tmp_path / "model"), method=method, output_dir=str(tmp_path / "runs"),
            concepts=[{"id": "c", "images": str(concept_dir), "super_category": "star"}]))[0].config_hash()
            for method in ("dreambooth", "textual_inversion", "core", "attndreambooth", "custom_diffusion")}

    spoken = json.loads((WORLD_MODEL / SCALE_FILE).read_text())
    before = hashes({k: v for k, v in spoken.items() if k not in ("prompts", "augmentation_words")})  # runs' hashes before
    after = hashes(spoken)
    assert {m for m in after if after[m] != before[m]} == {"custom_diffusion"}


def test_without_augmentation_words_a_crop_trains_under_the_plain_prompt():
    from personalize.data import Batcher, LatentBank

    class Fill:
        def fill(self, template: str) -> str:
            return template.format(placeholder="<c>", super_category="star")

    bank = LatentBank(torch.zeros(3, 4, 2, 2), torch.zeros(3, 4, 2, 2), ["a far away ", "", "zoomed in "],
                      torch.ones(3, 1, 2, 2), 1.0)
    template = "a photo of a {placeholder} {super_category}"
    worded, plain = Batcher(bank, Fill(), [template]), Batcher(bank, Fill(), [template], augmentation_words=False)
    assert [worded.prompt(i, template) for i in range(3)] == [
        "a far away a photo of a <c> star", "a photo of a <c> star", "zoomed in a photo of a <c> star"]
    assert [plain.prompt(i, template) for i in range(3)] == ["a photo of a <c> star"] * 3
    a = worded.draw(6, torch.Generator().manual_seed(0), use_prior=False)
    b = plain.draw(6, torch.Generator().manual_seed(0), use_prior=False)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.masks, b.masks)  # the same crops and loss masks
