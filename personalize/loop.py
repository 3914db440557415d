"""The one training loop. A method is an ordered list of stages; nothing here names a method.

Each stage: select what trains (everything else frozen), a fresh optimizer and learning-rate schedule by name
(personalize/optim.py), its loss terms summed with weights and logged one by one, its registered hooks around
each update (personalize/stage_hooks.py); a checkpoint at its end (and every K steps), so a resumed run
continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from personalize import checkpoint as ckpt
from personalize.attention import attention_hooks
from personalize.data import generator
from personalize.distributed import average_gradients, barrier, is_main, world
from personalize.errors import RunStateError
from personalize.losses import LOSS_TERMS, at_model_level, combined_needs
from personalize.method_spec import StageSpec
from personalize.optim import lr_at, make_optimizer
from personalize.outcome import RunOutcome
from personalize.params import set_trainable, trained_parameters
from personalize.run_context import RunContext
from personalize.run_settings import RunSpec
from personalize.stage_hooks import build_hooks, finish_hooks, hooks_state, hooks_tensors, sampling_weights
from personalize.step_engine import StepEngine
from personalize.validation import Schedule, Validator


class Sink(Protocol):
    """Where a run reports: local files, Ray Train, MLflow. Metrics are named train/<stage>/<term>."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def stage_finished(self, index: int, stage: StageSpec, checkpoint: Path, seconds: float) -> None: ...

    def validated(self, step: int, metrics: dict[str, float], grid: Path | None) -> None:
        """A validation point: `val/*` metrics and its sample grid (on rank 0; other ranks hear of it without them)."""


class NullSink:
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def stage_finished(self, index: int, stage: StageSpec, checkpoint: Path, seconds: float) -> None:
        pass

    def validated(self, step: int, metrics: dict[str, float], grid: Path | None) -> None:
        pass


@dataclass
class StageResult:
    name: str
    steps: int
    seconds: float
    last_losses: dict[str, float] = field(default_factory=dict)


def run_stage(ctx: RunContext, index: int, stage: StageSpec, sink: Sink, resume: ckpt.Checkpoint | None,
              global_step: int, progress: bool = True, validator: Schedule | None = None) -> StageResult:
    spec = ctx.spec
    trainable = set_trainable(ctx.models, stage)
    names = list(trainable)
    optimizer = make_optimizer(list(trainable.values()), stage)
    start, stage_state, hook_tensors = 0, {}, {}
    if resume is not None and resume.cursor.stage_index == index and resume.optimizer is not None:
        ckpt.restore_optimizer(optimizer, names, resume.optimizer)
        start, stage_state, hook_tensors = resume.cursor.step, resume.cursor.stage_state, resume.hook_tensors
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.autocast_dtype == torch.float16)
    if "scaler" in stage_state:
        scaler.load_state_dict(stage_state["scaler"])
    hooks = build_hooks(ctx, stage, {**stage_state, "tensors": hook_tensors})
    losses = at_model_level(stage.losses, ctx.components.is_sdxl, spec.resolution // ctx.components.vae_scale)
    terms = {t: (LOSS_TERMS[t], LOSS_TERMS[t].params.model_validate(s.params), s.weight) for t, s in losses.items()}
    needs = combined_needs(losses)
    capture = needs.capture.merge(needs.context_capture) if needs.capture else needs.context_capture
    prompts = [stage.prompt] if isinstance(stage.prompt, str) else stage.prompt

    rank, world_size = world()
    # a stage resumed from a mid-stage checkpoint counts the time it had run before, so its time is the whole stage's
    began, last = time.perf_counter() - stage_state.get("seconds", 0.0), {}
    bar = tqdm(range(start, stage.steps), desc=f"{spec.concept.id}/{spec.method.name}: {stage.name}",
               disable=not progress or rank > 0, initial=start, total=stage.steps, leave=False)
    with attention_hooks(ctx.components.unet, capture, spec.method.attention.detach_start_token) as store, \
            gradient_checkpointing(ctx, trainable, enabled=spec.gradient_checkpointing and capture is None):
        engine = StepEngine(ctx, needs, store, prompts, stage.context_prompts, stage.noise_offset)
        readback = DeferredReadback(ctx.device)

        def report(step: int, values: list[float]) -> None:
            nonlocal last
            totals = dict(zip([*terms, "loss"], values))
            if not all(math.isfinite(v) for v in totals.values()):
                raise FloatingPointError(f"stage {stage.name} step {step}: non-finite loss {totals}")
            last = totals
            sink.log_metrics({f"train/{stage.name}/{k}": v for k, v in totals.items()}, global_step + step)
            bar.set_postfix(loss=f"{totals['loss']:.4g}")

        try:
            for step in bar:
                for hook in hooks:
                    hook.before_step(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(stage, step)
                optimizer.zero_grad(set_to_none=True)
                sums = accumulate(ctx, engine, stage, terms, scaler, (spec.seed, "step", index, step), rank, world_size)
                readback.flush(report)  # the previous step's losses: ready by now, so reading them costs the GPU no wait
                average_gradients(trainable.values())
                if stage.max_grad_norm is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(trainable.values(), stage.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                for hook in hooks:
                    hook.after_update(step + 1)
                readback.push(step, sums)
                done = step + 1
                if validator is not None and validator.due(global_step + done):
                    readback.flush(report)  # weights are validated only once their step's loss was seen to be finite
                    with sampling_weights(hooks):
                        validate(ctx, validator, sink, global_step + done, stage.name, rank)
                if spec.checkpoint_every and done % spec.checkpoint_every == 0 and done < stage.steps and rank == 0:
                    readback.flush(report)  # a checkpoint is written only after its step's loss was seen to be finite
                    state = {"seconds": time.perf_counter() - began, **hooks_state(hooks), **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {})}
                    ckpt.save(ctx.run_dir / ckpt.CHECKPOINTS / ckpt.LATEST, ckpt.Cursor(index, done, spec.config_hash(), spec.seed, state, ctx.photos),
                              learned_state(ctx, index), ckpt.optimizer_tensors(optimizer, dict(enumerate(names))),
                              hooks_tensors(hooks))
        finally:  # the last step's losses, also when a step fails after it
            readback.flush(report)
        finish_hooks(hooks)
    for p in trainable.values():
        p.requires_grad_(False)
    return StageResult(stage.name, stage.steps - start, time.perf_counter() - began, last)


def validate(ctx: RunContext, validator: Schedule, sink: Sink, step: int, stage: str, rank: int) -> None:
    """One validation point, measured on rank 0 (the others wait at the next gradient average)."""
    if rank > 0:
        sink.validated(step, {}, None)
        return
    point, grid = validator.validate(step, stage, learned_state(ctx, len(ctx.spec.method.stages) - 1))
    sink.validated(step, point.metrics(), grid)


def accumulate(ctx: RunContext, engine: StepEngine, stage: StageSpec, terms: dict, scaler, step_key: tuple,
               rank: int, world_size: int) -> torch.Tensor:
    """Forward and backward over the stage's micro-batches; returns each term's (and the total's) mean value, as
    one tensor still on the device."""
    sums = None
    for micro in range(stage.grad_accum):
        gen = generator(*step_key, micro, *((rank,) if world_size > 1 else ()))
        record = engine.record(ctx.batcher.draw(stage.batch_size, gen, stage.use_class_prior), gen)
        values = [term.fn(record, params) for term, params, _ in terms.values()]
        loss = sum(weight * v for v, (_, _, weight) in zip(values, terms.values()))
        scaler.scale(loss / stage.grad_accum).backward()
        step_values = torch.stack([v.detach().float() for v in values] + [loss.detach().float()]) / stage.grad_accum
        sums = step_values if sums is None else sums + step_values
    return sums


class DeferredReadback:
    """Step losses read back one step late: on a GPU the copy to the host is queued behind the step and read after
    the next step was queued, so the host never stalls the device to print or check a loss (a plain `.tolist()`
    right after backward would, every step)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: tuple[int, torch.Tensor, torch.cuda.Event | None] | None = None

    def push(self, step: int, values: torch.Tensor) -> None:
        if not self.cuda:
            self.pending = (step, values, None)
            return
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending = (step, host, event)

    def flush(self, report) -> None:
        if self.pending is None:
            return
        step, values, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        report(step, values.tolist())


@contextlib.contextmanager
def gradient_checkpointing(ctx: RunContext, trainable: dict, enabled: bool):
    """Recompute activations in backward for the trained models (not with attention capture: the maps a loss
    reads come from the first forward, which a recompute would not reproduce)."""
    models = [m for name, m in ctx.models.items() if enabled and any(k.startswith(name + ".") for k in trainable)]
    for model in models:
        (model.enable_gradient_checkpointing if hasattr(model, "enable_gradient_checkpointing") else model.gradient_checkpointing_enable)()
    try:
        yield
    finally:
        for model in models:
            (model.disable_gradient_checkpointing if hasattr(model, "disable_gradient_checkpointing") else model.gradient_checkpointing_disable)()


def learned_state(ctx: RunContext, upto: int) -> dict[str, torch.Tensor]:
    """Every parameter trained by stages 0..upto, as it is now (the frozen base is never saved)."""
    return {k: v.detach() for k, v in trained_parameters(ctx.models, ctx.spec.method.stages[: upto + 1]).items()}


def run_method(spec: RunSpec, sink: Sink | None = None, components=None, progress: bool = True,
               on_stage_end=None, resume: bool = True, scorers=None) -> RunOutcome:
    """Train one concept with one method; a finished run is never redone. With `resume`, a run that stopped
    part-way continues from its latest checkpoint; without it, such a run is an error (nothing is overwritten).
    `on_stage_end(ctx, index, stage)` runs after each stage's checkpoint, before the sink hears of the stage.
    With `spec.validation`, the validation points are scored by `scorers` (loaded from its settings if None)."""
    from personalize import export, loss_log, run_folder
    from personalize.fingerprint import photos_fingerprint
    from personalize.heatmaps import write_stage_heatmaps
    from personalize.run_context import prepare_run
    from personalize.sampling import write_sample_grid

    run_dir = spec.run_dir
    config_hash = spec.config_hash()
    done = run_folder.read_done(run_dir)
    if done is not None:
        run_folder.check_owner(run_dir, done["config_hash"], spec)
        run_folder.check_photos(run_dir, done, spec)
        return RunOutcome(spec, "skipped", "already finished", stage_seconds=run_folder.stage_seconds(done),
                          outputs=done.get("outputs", []))
    photos = photos_fingerprint(spec)  # before reading them: what this run trains on
    checkpoint = ckpt.latest(run_dir)
    if checkpoint is not None:
        run_folder.check_owner(run_dir, checkpoint.cursor.config_hash, spec)
        run_folder.check_resumed_photos(run_dir, checkpoint.cursor.photos, photos, spec.concept.id)
        if not resume:
            raise RunStateError(f"{run_dir} holds a run that stopped part-way; pass --resume to continue it")
    ctx = prepare_run(spec, components, progress)
    ctx.photos = photos
    main = is_main()
    if main:
        run_folder.write_resolved_config(spec)
    stages = spec.method.stages
    offsets = [sum(s.steps for s in stages[:i]) for i in range(len(stages))]
    start_stage, first_step = 0, None
    if checkpoint is not None:
        ckpt.apply_learned(ctx.models, checkpoint.learned)
        start_stage = checkpoint.cursor.stage_index
        first_step = offsets[start_stage] + checkpoint.cursor.step if start_stage < len(stages) else sum(s.steps for s in stages)
    sink = loss_log.MultiSink(loss_log.FileSink(run_dir, first_step) if main else None, sink)
    validator = validator_for(ctx, scorers, first_step) if spec.validation is not None else None

    results = []
    for index in range(start_stage, len(stages)):
        stage = stages[index]
        result = run_stage(ctx, index, stage, sink, checkpoint, offsets[index], progress, validator)
        path = ckpt.stage_dir(run_dir, index, stage.name)
        if main:
            ckpt.save(path, ckpt.Cursor(index + 1, 0, config_hash, spec.seed, photos=photos), learned_state(ctx, index))
            ckpt.discard_latest(run_dir)
        barrier()
        if spec.samples.heatmaps and main:
            write_stage_heatmaps(ctx, index, stage.name)
        if spec.samples.every_stage and main and index < len(stages) - 1:  # the last one is samples.png
            (run_dir / "samples").mkdir(exist_ok=True)
            write_sample_grid(ctx, run_dir / "samples" / f"stage-{index:02d}-{stage.name}.png")
        if on_stage_end is not None:
            on_stage_end(ctx, index, stage)
        sink.stage_finished(index, stage, path, result.seconds)
        results.append(result)

    finished = RunOutcome(spec, "finished", seconds=round(sum(r.seconds for r in results), 2),
                          stage_seconds={r.name: round(r.seconds, 2) for r in results},
                          last_losses=results[-1].last_losses if results else {})
    if not main:
        return finished
    details = {}
    if validator is not None:  # the exports below come from the chosen point's weights
        details = {"selection": validator.select(), "validation_seconds": validator.seconds()}
    finished.outputs = _write_outputs(ctx, export)
    write_sample_grid(ctx, run_dir / "samples.png")
    finished.outputs.append("samples.png")
    run_folder.write_done(run_dir, config_hash, finished.outputs, photos=photos, **details)
    return finished


def validator_for(ctx: RunContext, scorers, resumed_at: int | None) -> Schedule:
    """Rank 0's validator (other ranks only know when points fall); scorers loaded from the settings if not given."""
    settings = ctx.spec.validation
    total = sum(s.steps for s in ctx.spec.method.stages)
    if not is_main():
        return Schedule(settings, total)
    if scorers is None:
        from personalize.scoring import scorers_on

        scorers = scorers_on(settings, ctx.device)
    return Validator(ctx, settings, scorers, resumed_at, total)


def _write_outputs(ctx: RunContext, export) -> list[str]:
    from personalize.sampling import subject_phrase
    from personalize.tokens import learned_vectors, placeholder_embeddings

    run_dir = ctx.run_dir
    widths = [emb.rows.shape[1] for emb in placeholder_embeddings(ctx.components)]
    written = export.save_embeddings(run_dir, ctx.spec.concept.id, learned_vectors(ctx.components, ctx.placeholders), widths)
    learned = learned_state(ctx, len(ctx.spec.method.stages) - 1)
    unet = export.save_unet(run_dir, learned)
    written += [unet] if unet else []
    written += export.save_lora(run_dir, ctx.spec.concept.id, learned, ctx.spec.method.stages)
    written.append(export.save_placeholders(run_dir, ctx.placeholders, subject_phrase(ctx.spec.method, ctx.placeholders)))
    ctx.instances.save(run_dir / "instance_latents.safetensors")
    written.append(run_dir / "instance_latents.safetensors")
    return [str(Path(p).relative_to(run_dir)) for p in written]
