"""On the tiny model, from the same seed, each regulariser ends with a smaller value of what it regularises
than training without it; the norm lock holds the norm exactly; test-time optimisation touches only [V]."""

from __future__ import annotations

import pytest
import torch

from personalize.attention import attention_hooks
from personalize.data import generator
from personalize.loop import NullSink, run_method, run_stage
from personalize.losses import LOSS_TERMS, combined_needs
from personalize.models import load_components
from personalize.norm_lock import NormLock
from personalize.run_context import prepare_run
from personalize.step_engine import StepEngine
from personalize.tokens import placeholder_embedding


def train_first_stage(spec, tiny_model):
    ctx = prepare_run(spec, load_components(str(tiny_model)), progress=False)
    run_stage(ctx, 0, spec.method.stages[0], NullSink(), None, 0, progress=False)
    return ctx


@torch.no_grad()
def measure(ctx, stage, term: str, params: dict, draws: int = 4) -> float:
    """Mean value of a loss term over fixed evaluation batches (same draws for every model)."""
    spec = LOSS_TERMS[term]
    parsed = spec.params.model_validate(params)
    needs = combined_needs({term: params})
    capture = needs.capture.merge(needs.context_capture) if needs.capture else needs.context_capture
    with attention_hooks(ctx.components.unet, capture) as store:
        engine = StepEngine(ctx, needs, store)
        values = []
        for k in range(draws):
            gen = generator("evaluation", k)
            values.append(float(spec.fn(engine.record(ctx.batcher.draw(4, gen, False), gen), parsed)))
    return sum(values) / len(values)


def with_and_without(spec_for, tiny_model, method: str, stage: str, weights_on: dict, **overrides):
    results = {}
    for label, factor in (("on", 1.0), ("off", 0.0)):
        spec = spec_for(method, stage_overrides=overrides)
        spec = spec.model_copy(update={"method": _set_weights(spec.method, stage, {t: w * factor for t, w in weights_on.items()})})
        results[label] = train_first_stage(spec, tiny_model)
    return results


def _set_weights(method, stage_name, weights):
    stages = []
    for s in method.stages:
        if s.name == stage_name:
            losses = {t: (spec.model_copy(update={"weight": weights[t]}) if t in weights else spec) for t, spec in s.losses.items()}
            s = s.model_copy(update={"losses": losses})
        stages.append(s)
    return method.model_copy(update={"stages": stages})


def test_attndreambooth_regulariser_shrinks_the_mean_variance_gap(spec_for, tiny_model):
    runs = with_and_without(spec_for, tiny_model, "attndreambooth", "embedding_alignment",
                            {"attn_mean_var_reg": 1.0}, steps=12, lr=0.05)
    gap = {k: measure(ctx, None, "attn_mean_var_reg", {"mu": 1.0, "var": 1.0}) for k, ctx in runs.items()}
    assert gap["on"] < gap["off"], gap


def test_core_regularisers_keep_the_context_outputs_close_to_the_reference(spec_for, tiny_model):
    runs = with_and_without(spec_for, tiny_model, "core", "embedding",
                            {"core_context_embedding": 1.0, "core_context_attention": 50.0}, steps=12, lr=0.05)
    for variant in ("official", "paper"):
        distance = {k: measure(ctx, None, "core_context_embedding", {"variant": variant}) for k, ctx in runs.items()}
        assert distance["on"] < distance["off"], (variant, distance)


def test_disendiff_binding_raises_the_binding_iou(spec_for, tiny_model):
    runs = with_and_without(spec_for, tiny_model, "disendiff", "calibrate",
                            {"disendiff_binding": 2.0, "disendiff_separation": 0.0}, steps=30, lr=0.01)
    binding = {k: measure(ctx, None, "disendiff_binding", {"resolution": 16}) for k, ctx in runs.items()}
    assert binding["on"] < binding["off"], binding


def lock_stage():
    from personalize.method_spec import StageSpec

    return StageSpec(name="s", trainable=["placeholder"], steps=10, lr=1.0, losses={"diffusion": 1.0},
                     embedding_norm_lock={"start": 3, "end": 6})


def test_norm_lock_holds_the_joint_norm_of_all_rows_exactly_inside_its_window_only():
    stage = lock_stage()
    rows = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
    lock = NormLock(stage, {}, [rows])
    joint, per_row = [], []
    for step in range(1, 9):
        with torch.no_grad():
            rows.mul_(1.5).add_(0.1)  # an "optimizer update" that grows the norm and shifts the rows' ratio
        lock.after_update(step)
        joint.append(rows.detach().pow(2).sum().sqrt().item())  # Frobenius norm of both rows together
        per_row.append(rows.detach().norm(dim=-1).clone())
    recorded = joint[2]  # after update 3
    for step in (4, 5, 6):
        assert joint[step - 1] == pytest.approx(recorded, rel=1e-6, abs=0)
        # one common factor for both rows: the rows' own norms are not each held
        assert not torch.allclose(per_row[step - 1], per_row[2], rtol=1e-4, atol=0)
    assert joint[6] > recorded and joint[1] < recorded  # free after the window and before it
    assert NormLock(stage, lock.state(), [rows]).norm.item() == pytest.approx(recorded, rel=1e-6)


def test_norm_lock_restores_from_a_per_row_checkpoint():
    stage = lock_stage()
    # one vector: the old layout {"norms": [norm of the row]} is the joint norm itself
    rows = torch.nn.Parameter(torch.tensor([[6.0, 8.0]]))
    NormLock(stage, {"norms": [5.0]}, [rows]).after_update(4)
    assert torch.equal(rows.detach(), torch.tensor([[3.0, 4.0]]))
    # several vectors: the per-row norms combine into the joint norm they were recorded from
    assert NormLock(stage, {"norms": [3.0, 4.0]}, [rows]).norm.item() == pytest.approx(5.0)
    assert NormLock(stage, {}, [rows]).state() == {}


def test_norm_lock_keeps_each_text_encoders_rows_at_their_own_norm():
    """SDXL: a placeholder has rows in two encoders of different scales; each keeps the joint norm it had."""
    stage = lock_stage()
    first, second = torch.nn.Parameter(torch.tensor([[3.0, 4.0]])), torch.nn.Parameter(torch.tensor([[0.0, 10.0, 0.0]]))
    lock = NormLock(stage, {}, [first, second])
    for step in range(1, 6):
        with torch.no_grad():
            first.mul_(2.0)
            second.add_(1.0)
        lock.after_update(step)
    assert lock.state()["norms"] == pytest.approx([40.0, torch.tensor([3.0, 13.0, 3.0]).norm().item()])
    assert first.detach().norm().item() == pytest.approx(40.0)  # held after updates 4 and 5
    assert second.detach().norm().item() == pytest.approx(lock.state()["norms"][1], rel=1e-6)
    assert NormLock(stage, lock.state(), [first, second]).norm.tolist() == pytest.approx(lock.state()["norms"])


def test_norm_lock_survives_a_resume_inside_its_window(spec_for, tiny_model, tmp_path, monkeypatch):
    over = {"steps": 5}
    reference = spec_for("core", stage_overrides=over, output_dir=str(tmp_path / "a"), checkpoint_every=1)
    reference = reference.model_copy(update={"method": _lock(reference.method)})
    run_method(reference, components=load_components(str(tiny_model)), progress=False)
    spec = spec_for("core", stage_overrides=over, output_dir=str(tmp_path / "b"), checkpoint_every=1)
    spec = spec.model_copy(update={"method": _lock(spec.method)})
    from personalize.faults import InjectedFault

    monkeypatch.setenv("PERSONALIZE_INJECT_FAULT", f"embedding:3:{tmp_path / 'marker'}")
    with pytest.raises(InjectedFault):
        run_method(spec, components=load_components(str(tiny_model)), progress=False)
    run_method(spec, components=load_components(str(tiny_model)), progress=False, resume=True)
    from safetensors.torch import load_file

    a = load_file(str(reference.run_dir / "learned_embeds.safetensors"))
    b = load_file(str(spec.run_dir / "learned_embeds.safetensors"))
    assert torch.equal(a["<blob>"], b["<blob>"])


def _lock(method):
    from personalize.method_spec import NormLockSpec

    first = method.stages[0].model_copy(update={"embedding_norm_lock": NormLockSpec(start=1, end=4)})
    return method.model_copy(update={"stages": [first] + list(method.stages[1:])})


def test_test_time_optimisation_changes_only_the_placeholder(spec_for, tiny_model):
    from personalize.sampling import LoadedRun
    from personalize.tto import optimize_for_prompt

    spec = spec_for("core")
    run_method(spec, components=load_components(str(tiny_model)), progress=False)
    run = LoadedRun(spec.run_dir)
    models = {"unet": run.components.unet, "text_encoder": run.components.text_encoder}
    before = {f"{m}.{n}": p.detach().clone() for m, model in models.items() for n, p in model.named_parameters()}
    rows = optimize_for_prompt(run, "a {} in a snowy forest", steps=3, progress=False)
    after = {f"{m}.{n}": p.detach().clone() for m, model in models.items() for n, p in model.named_parameters()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"text_encoder.embeddings.token_embedding.rows"}
    assert torch.equal(rows, placeholder_embedding(run.components.text_encoder).rows.detach())
    assert not any((spec.run_dir / "checkpoints" / "latest").exists() for _ in [0])


def test_test_time_optimisation_works_on_other_methods_with_a_placeholder(spec_for, tiny_model):
    from personalize.errors import ConceptError
    from personalize.sampling import LoadedRun
    from personalize.tto import optimize_for_prompt

    ti = spec_for("textual_inversion")
    run_method(ti, components=load_components(str(tiny_model)), progress=False)
    before = placeholder_embedding(LoadedRun(ti.run_dir).components.text_encoder).rows.detach().clone()
    rows = optimize_for_prompt(LoadedRun(ti.run_dir), "a {} on the moon", steps=2, progress=False)
    assert not torch.equal(rows, before)
    db = spec_for("dreambooth")
    run_method(db, components=load_components(str(tiny_model)), progress=False)
    with pytest.raises(ConceptError, match="learned no placeholder"):
        optimize_for_prompt(LoadedRun(db.run_dir), "a {} on the moon", steps=2, progress=False)


def test_evaluation_with_test_time_optimisation_tunes_each_prompt_and_restores_the_embedding(spec_for, tiny_model):
    from personalize.evaluation import RunSampler, settings_key
    from personalize.run_settings import EvaluationSpec
    from personalize.scoring import eval_rows, protocol

    spec = spec_for("core")
    run_method(spec, components=load_components(str(tiny_model)), progress=False)
    sampler = RunSampler(spec.run_dir)
    run = sampler.run
    settings = EvaluationSpec(prompts="personalize_eval", samples=2, steps=2)
    rows = [r for r in eval_rows(run.spec, run.subject, run.placeholders.strings, settings) if r.prompt_index < 2]
    sampling = protocol(run.spec, settings)
    plain = sampler.generate(rows, sampling, batch_size=4)
    tuned = sampler.generate(rows, sampling, batch_size=4, tto=True)
    assert len(tuned) == len(rows) == 4
    assert all(a.tobytes() != b.tobytes() for a, b in zip(plain, tuned))  # every prompt sampled with its tuned token
    assert torch.equal(placeholder_embedding(run.components.text_encoder).rows.detach(), run.trained_rows)
    again = sampler.generate(rows, sampling, batch_size=4)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(plain, again))
    tto = settings.model_copy(update={"tto": True})
    assert settings_key(tto, sampling) != settings_key(settings, sampling)  # its own evaluation folder
