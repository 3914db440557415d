"""Test-time optimisation (CoRe): a few steps of the context regularisers alone on the placeholder embedding,
for one prompt, before generating. Works on any run that learned a placeholder; UNet and text encoder stay
untouched. The stage comes from the run's method (`test_time`) or, if it has none, from CoRe's recipe."""

from __future__ import annotations

import torch

from personalize.config import load_method
from personalize.data import Batcher, LatentBank
from personalize.devices import resolve_precision
from personalize.errors import ConceptError
from personalize.loop import NullSink, run_stage
from personalize.method_spec import StageSpec
from personalize.run_context import RunContext
from personalize.sampling import LoadedRun
from personalize.tokens import joined_rows, placeholder_embeddings, restore_joined_rows, single_token_id


def test_time_stage(run: LoadedRun, steps: int | None = None) -> StageSpec:
    from personalize.scaling import load_recipe_scale

    stage = run.spec.method.test_time or load_method("core", scale=load_recipe_scale(run.spec.model)).test_time
    return stage.model_copy(update={"steps": steps}) if steps else stage


def optimize_for_prompt(run: LoadedRun, template: str, steps: int | None = None, progress: bool = True) -> torch.Tensor:
    """Tune the placeholder rows for `template` ('{}' = the subject) in place; returns the new rows (of every text
    encoder, joined)."""
    spec = run.spec.model_copy(update={"checkpoint_every": 0})
    if not run.placeholders.learned or not placeholder_embeddings(run.components):
        raise ConceptError(spec.concept.id, f"method {spec.method.name} learned no placeholder embedding",
                           "test-time optimisation needs a run of a method with a learned token")
    if "{}" not in template:
        raise ConceptError(spec.concept.id, f"prompt {template!r} has no '{{}}' marking the subject", "write e.g. 'a {} on the beach'")
    tokenizer = run.components.tokenizer
    class_ids = [single_token_id(tokenizer, c, spec.concept.id) for c in run.placeholders.super_categories]
    instances = LatentBank.load(run.run_dir / "instance_latents.safetensors")
    ctx = RunContext(
        spec=spec, components=run.components, placeholders=run.placeholders, class_ids=class_ids, instances=instances,
        batcher=Batcher(instances, run.placeholders, [template], augmentation_words=spec.method.augmentation_words),
        context_templates=[template], device=run.device,
        autocast_dtype=resolve_precision(spec.mixed_precision, run.device), prior_folder=None, subject=run.subject,
    )
    stage = test_time_stage(run, steps).model_copy(update={"prompt": template, "context_prompts": [template]})
    restore_joined_rows(run.components, run.trained_rows)  # every prompt starts from the trained embedding
    run_stage(ctx, len(spec.method.stages), stage, NullSink(), None, 0, progress)
    return joined_rows(run.components).clone()
