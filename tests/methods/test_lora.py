"""LoRA stages: only the adapters train, and the run's files load where users load them (diffusers' LoRA loader,
the kohya layout through diffusers' converter, this project's own run loader, the MLflow model's folder) and give
the run's own sample."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from personalize.loop import run_method
from personalize.method_spec import LoraSpec, StageSpec
from personalize.params import stage_parameters
from tests.methods.conftest import ALPHA, RANK, own_sample, picture, user_pipeline


def test_only_the_adapters_train_and_only_they_are_saved(lora_run):
    run = lora_run.run_dir
    outputs = set(load_file(str(run / "pytorch_lora_weights.safetensors")))
    assert not (run / "unet.safetensors").exists() and not (run / "learned_embeds.safetensors").exists()
    # rank-2 adapters on q, k, v, out of 2 attention layers in each of the tiny UNet's 7 transformer blocks
    assert len(outputs) == 7 * 2 * 4 * 2
    assert all(k.startswith("unet.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in outputs)
    down = load_file(str(run / "pytorch_lora_weights.safetensors"))
    assert all(v.shape[0] == RANK for k, v in down.items() if ".lora_A." in k)
    assert any(v.abs().max() > 0 for k, v in down.items() if ".lora_B." in k)  # B starts at zero: it trained
    checkpoint = load_file(str(run / "checkpoints" / "stage-00-finetune" / "learned.safetensors"))
    assert len(checkpoint) == len(outputs) and all(".lora_" in k for k in checkpoint)


def test_diffusers_lora_loader_gives_the_runs_sample(lora_run, tiny_model):
    pipe = user_pipeline(tiny_model)
    base = picture(pipe)
    pipe.load_lora_weights(str(lora_run.run_dir))  # the default weight name: pytorch_lora_weights.safetensors
    loaded = picture(pipe)
    assert np.abs(loaded - own_sample(lora_run.run_dir)).mean() <= 1e-4
    assert np.abs(loaded - base).mean() > 1e-2  # the adapters change the picture


def test_kohya_file_converts_without_a_stray_key_and_gives_the_runs_sample(lora_run, tiny_model, caplog):
    name = "blob.lora.safetensors"
    path = lora_run.run_dir / name
    kohya = load_file(str(path))
    modules = {k.split(".")[0] for k in kohya}
    assert all(m.startswith("lora_unet_") for m in modules)
    assert set(kohya) == {f"{m}.{part}" for m in modules for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert {float(kohya[f"{m}.alpha"]) for m in modules} == {ALPHA}
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["ss_network_dim"] == str(RANK)

    state, alphas = StableDiffusionPipeline.lora_state_dict(str(lora_run.run_dir), weight_name=name)
    assert len(state) == 2 * len(modules) and all(k.startswith("unet.") for k in state)
    assert len(alphas) == len(modules) and set(alphas.values()) == {ALPHA}
    diffusers_keys = set(load_file(str(lora_run.run_dir / "pytorch_lora_weights.safetensors")))
    assert {as_peft(k) for k in state} == diffusers_keys  # every converted key is one the run wrote, none left over

    pipe = user_pipeline(tiny_model)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(lora_run.run_dir), weight_name=name)
    assert not [r.message for r in caplog.records if re.search(r"unexpected keys|missing keys|not (been )?loaded|not used", r.message, re.I)]
    assert np.abs(picture(pipe) - own_sample(lora_run.run_dir)).mean() <= 1e-4


def as_peft(key: str) -> str:
    """diffusers' converter names kohya keys the attention-processor way ('attn1.processor.to_out_lora.down.weight');
    the same module in peft's layout is 'attn1.to_out.0.lora_A.weight'."""
    def rename(m: re.Match) -> str:
        module = m[1] + (".0" if m[1] == "to_out" else "")
        return f".{module}.lora_{'A' if m[2] == 'down' else 'B'}.weight"

    return re.sub(r"\.processor\.(to_[qkv]|to_out)_lora\.(down|up)\.weight$", rename, key)


def test_the_run_loader_and_the_mlflow_model_folder_give_the_runs_sample(lora_run, tmp_path):
    from personalize.sampling import LoadedRun, generate
    from pipelines.registry import learned_folder

    folder = learned_folder(lora_run.run_dir, tmp_path / "model")
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    run = LoadedRun(folder, device="cpu")
    image = generate(run.pipeline("ddim"), [run.fill("a photo of a {}")], [0], 64, steps=3)[0]
    assert np.abs(np.asarray(image, dtype=np.float32) / 255 - own_sample(lora_run.run_dir)).mean() <= 1e-4


def test_lora_targets_must_be_trainable_parts_and_one_shape_per_model():
    base = {"name": "s", "steps": 1, "lr": 1.0, "losses": {"diffusion": 1.0}}
    with pytest.raises(ValueError, match="not among the stage's trainable parts"):
        StageSpec(**base, trainable=["unet.attn2"], lora={"targets": ["unet.attn"]})
    with pytest.raises(ValueError, match="leave 'placeholder' out"):
        StageSpec(**base, trainable=["placeholder", "unet"], lora={"targets": ["placeholder"]})
    with pytest.raises(ValueError, match="needs a UNet or text-encoder selector"):
        StageSpec(**base, trainable=["placeholder"], lora={})
    stage = StageSpec(**base, trainable=["placeholder", "unet.attn2"], lora={"rank": 8})
    assert stage.lora_targets == ["unet.attn2"] and stage.lora.scale_alpha == 8.0
    assert LoraSpec(rank=4, alpha=2).scale_alpha == 2.0

    from personalize.method_spec import MethodSpec

    with pytest.raises(ValueError, match="different shapes"):
        MethodSpec(name="m", stages=[StageSpec(**{**base, "name": "a"}, trainable=["unet.attn2"], lora={"rank": 4}),
                                     StageSpec(**{**base, "name": "b"}, trainable=["unet"], lora={"rank": 8})])


def test_a_stage_with_lora_selects_adapters_not_weights(spec_for, tiny_model):
    from personalize.models import load_components
    from personalize.run_context import prepare_run

    spec = spec_for("dreambooth_lora")
    ctx = prepare_run(spec, load_components(str(tiny_model)), progress=False)
    chosen = stage_parameters(ctx.models, spec.method.stages[0])
    assert chosen and all(".lora_A.learned." in k or ".lora_B.learned." in k for k in chosen)
    assert all(".attn1." in k or ".attn2." in k for k in chosen)
    # the weights under the adapters stay frozen and are not what a plain selector would now pick twice
    assert not any(p.requires_grad for n, p in ctx.models["unet"].named_parameters() if "base_layer" in n)


@pytest.mark.parametrize("variant, parent, stage", [("core_lora", "core", "identity"),
                                                    ("attndreambooth_lora", "attndreambooth", "subject_identity"),
                                                    ("rare_two_stage_lora", "rare_two_stage", "model")])
def test_a_lora_variant_is_its_parent_with_only_the_identity_stage_changed(variant, parent, stage):
    from personalize.config import load_method

    child, base = load_method(variant), load_method(parent)
    assert child.name == variant
    changed = [s.name for s, b in zip(child.stages, base.stages) if s != b]
    assert changed == [stage] and len(child.stages) == len(base.stages) and child.test_time == base.test_time
    lora_stage = next(s for s in child.stages if s.name == stage)
    assert lora_stage.lora.rank == 4 and lora_stage.trainable == ["unet.attn"] and lora_stage.lr == 1e-4
    assert child.model_dump(exclude={"name", "summary", "stages"}) == base.model_dump(exclude={"name", "summary", "stages"})


def test_extends_names_the_problem(tmp_path):
    from personalize.config import load_method
    from personalize.errors import ConfigError

    (tmp_path / "nope.yaml").write_text("extends: no_such_method\nname: nope\n")
    with pytest.raises(ConfigError, match="extends 'no_such_method': no such method; available: .*core"):
        load_method(str(tmp_path / "nope.yaml"))
    (tmp_path / "loop.yaml").write_text(f"extends: {tmp_path / 'loop.yaml'}\nname: loop\n")
    with pytest.raises(ConfigError, match="cannot extend itself"):
        load_method(str(tmp_path / "loop.yaml"))
    (tmp_path / "bad.yaml").write_text("extends: core\nname: bad\noverrides: {stages.nostage.lr: 1.0}\n")
    with pytest.raises(ConfigError, match="no item named 'nostage'"):
        load_method(str(tmp_path / "bad.yaml"))


def test_text_encoder_lora_with_a_learned_token_loads_in_diffusers_and_kohya(tiny_model, tmp_path, caplog):
    """A stage training the token and rank-2 adapters on the text encoder's attention and the UNet's cross-attention:
    both adapter sets, and the token, load the way diffusers users load them and give the run's sample."""
    from tests.conftest import draw_concept, quick_spec

    spec = quick_spec("textual_inversion", tiny_model, draw_concept(tmp_path / "images"), tmp_path / "out",
                      stage_overrides={"lr": 1e-2, "steps": 3, "trainable": ["placeholder", "text_encoder.attn", "unet.attn2"],
                                       "lora": {"rank": 2}},
                      samples={"prompts": ["a photo of a {subject}"], "seeds": [0], "steps": 3})
    assert run_method(spec, progress=False).status == "finished"
    run = spec.run_dir
    layers = load_file(str(run / "pytorch_lora_weights.safetensors"))
    text = [k for k in layers if k.startswith("text_encoder.")]
    assert len(text) == 2 * 4 * 2 and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in text)  # 2 layers x q, k, v, out x (A, B)
    assert any(k.startswith("unet.") and ".attn2." in k for k in layers)
    kohya = load_file(str(run / "blob.lora.safetensors"))
    assert {k.split("_text_model")[0] for k in kohya if "_text_model" in k} == {"lora_te"}

    prompt = "a photo of a <blob>"
    for weight_name in ("pytorch_lora_weights.safetensors", "blob.lora.safetensors"):
        pipe = user_pipeline(tiny_model)
        pipe.load_textual_inversion(str(run / "learned_embeds.safetensors"))
        with caplog.at_level(logging.WARNING):
            pipe.load_lora_weights(str(run), weight_name=weight_name)
        assert not [r.message for r in caplog.records if re.search(r"unexpected keys|missing keys|No LoRA keys", r.message)]
        assert np.abs(picture(pipe, prompt) - own_sample(run)).mean() <= 1e-4, weight_name
        assert sum("lora_A" in n for n, _ in pipe.text_encoder.named_parameters()) == 2 * 4  # every adapter loaded
    from personalize.sampling import LoadedRun, generate

    loaded = LoadedRun(run, device="cpu")
    image = generate(loaded.pipeline("ddim"), [prompt], [0], 64, steps=3)[0]
    assert np.abs(np.asarray(image, dtype=np.float32) / 255 - own_sample(run)).mean() <= 1e-4
