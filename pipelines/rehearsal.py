"""A rehearsal of a batch: methods that train nothing, to try a large batch's orchestration (Ray Data's
preparation, scheduling, stage checkpoints, storage, MLflow tracking, the results table) on a cluster before
paying for GPU hours, and to measure what the orchestration costs per run.

    python -m pipelines.rehearsal methods/            # writes rehearsal.yaml and rehearsal_two_stage.yaml
    PERSONALIZE_PLUGINS=pipelines.rehearsal PERSONALIZE_REHEARSAL_STEP_S=0.05 \\
        personalize batch my_batch.yaml 'methods=[methods/rehearsal.yaml,methods/rehearsal_two_stage.yaml]'

Each step of a rehearsal method sleeps PERSONALIZE_REHEARSAL_STEP_S seconds (a GPU's step, simulated; 0.01 by
default) and logs a constant loss; each stage end writes a checkpoint of one small tensor and reports it as a
real stage does; a finished run holds a learned file, its losses, stage timings and DONE.json. No model is
loaded. A rehearsal interrupted part-way starts its run again from the first stage.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from personalize import checkpoint as ckpt
from personalize import loss_log, run_folder
from personalize.distributed import is_main
from personalize.outcome import RunOutcome
from personalize.run_settings import RunSpec
from personalize.runners import register_runner

STEP_VARIABLE = "PERSONALIZE_REHEARSAL_STEP_S"
LEARNED = "learned_embeds.safetensors"
METHODS = {
    "rehearsal": [("embedding", 20)],
    "rehearsal_two_stage": [("token", 10), ("model", 20)],
}


def method_yaml(name: str) -> str:
    stages = "".join(f"  - {{name: {stage}, trainable: [placeholder], steps: {steps}, lr: 1.0e-3, batch_size: 1, "
                     "losses: {diffusion: 1.0}}\n" for stage, steps in METHODS[name])
    return (f"name: {name}\npaper: \"a rehearsal: trains nothing\"\nsummary: \"sleeps {STEP_VARIABLE} seconds a step\"\n"
            "placeholder: {new_token: true, string: \"<{concept}>\", vectors: 1, init: super_category}\n"
            "prompt: \"a photo of a {placeholder} {super_category}\"\nstages:\n" + stages)


def write_methods(folder: str | Path) -> list[Path]:
    """The rehearsal methods' files, for a batch's `methods` list."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in METHODS:
        path = folder / f"{name}.yaml"
        path.write_text(method_yaml(name))
        paths.append(path)
    return paths


def rehearse(spec: RunSpec, sink=None, progress: bool = False, on_stage_end=None, resume: bool = True, **_) -> RunOutcome:
    run_dir, config_hash = spec.run_dir, spec.config_hash()
    done = run_folder.read_done(run_dir)
    if done is not None:
        run_folder.check_owner(run_dir, done["config_hash"], spec)
        return RunOutcome(spec, "skipped", "already finished", stage_seconds=run_folder.stage_seconds(done))
    main = is_main()
    if main:
        run_folder.write_resolved_config(spec)
    sink = loss_log.MultiSink(loss_log.FileSink(run_dir) if main else None, sink)
    step_seconds = float(os.environ.get(STEP_VARIABLE, "0.01"))
    offset, seconds = 0, {}
    for index, stage in enumerate(spec.method.stages):
        began = time.perf_counter()
        for step in range(stage.steps):
            time.sleep(step_seconds)
            sink.log_metrics({f"train/{stage.name}/loss": 0.1}, offset + step)
        path = ckpt.stage_dir(run_dir, index, stage.name)
        if main:
            ckpt.save(path, ckpt.Cursor(index + 1, 0, config_hash, spec.seed), {"rehearsal": torch.zeros(4)})
        seconds[stage.name] = round(time.perf_counter() - began, 2)
        sink.stage_finished(index, stage, path, seconds[stage.name])
        offset += stage.steps
    if main:
        save_file({"rehearsal": torch.zeros(4)}, str(run_dir / LEARNED))
        run_folder.write_done(run_dir, config_hash, [LEARNED], rehearsal_step_seconds=step_seconds)
    return RunOutcome(spec, "finished", seconds=sum(seconds.values()), stage_seconds=seconds, outputs=[LEARNED])


for _name in METHODS:
    register_runner(_name, rehearse)


if __name__ == "__main__":
    for written in write_methods(sys.argv[1] if len(sys.argv) > 1 else "."):
        print(written)
