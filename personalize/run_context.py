"""Everything one (concept, method) run builds once: models on the device, placeholders, cached data."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from personalize.data import (
    Batcher,
    LatentBank,
    bank_key,
    bucket_step,
    cached_instance_bank,
    instance_bank,
    prior_bank,
    training_shapes,
)
from personalize.devices import resolve_device, resolve_precision
from personalize.errors import ConceptError, ConfigError
from personalize.fingerprint import model_fingerprint
from personalize.images import find_masks, list_image_files, load_concept_captions, load_concept_images, read_image
from personalize.lora import add_adapters
from personalize.losses import combined_needs
from personalize.method_spec import StageSpec
from personalize.models import SDComponents, load_components
from personalize.params import SelectorError, stage_parameters, trained_parameters
from personalize.priors import class_prior_images
from personalize.prompts import context_set_for, load_prompt_set, templates
from personalize.run_settings import RunSpec
from personalize.sampling import subject_phrase
from personalize.step_record import Needs
from personalize.tokens import Placeholders, add_subject_tokens, find_roles, single_token_id, tokenize, word_ids

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    spec: RunSpec
    components: SDComponents
    placeholders: Placeholders
    class_ids: list[int | None]
    instances: LatentBank
    batcher: Batcher
    context_templates: list[str] | None
    device: torch.device
    autocast_dtype: torch.dtype | None
    prior_folder: Path | None
    subject: str  # how prompts name the subject: "[V]", "[V] dog" or "[V1] cat and [V2] dog"
    photos: str | None = None  # the fingerprint of the photos it trains on, recorded with its checkpoints

    @property
    def models(self) -> dict[str, nn.Module]:
        return self.components.models

    @property
    def run_dir(self) -> Path:
        return self.spec.run_dir


def all_stages(spec: RunSpec) -> list[StageSpec]:
    return spec.method.stages + ([spec.method.test_time] if spec.method.test_time else [])


def method_needs(spec: RunSpec) -> Needs:
    needs = Needs()
    for stage in all_stages(spec):
        needs = needs.merge(combined_needs(stage.losses))
    return needs


def check_class_words(spec: RunSpec, tokenizer) -> None:
    """A method that locates the class token needs each super-category to be one CLIP token: ConceptError if not.
    Needs only the tokenizer, so a batch refuses such a run before any worker or GPU is given to it."""
    if method_needs(spec).single_token_class:
        for subject in spec.concept.subjects:
            single_token_id(tokenizer, subject.super_category, spec.concept.id)


def _place_models(components: SDComponents, spec: RunSpec, device: torch.device, dtype: torch.dtype | None) -> None:
    """Everything on the device in the compute dtype, except the parameters some stage trains: those stay fp32
    (as loaded), so training updates full-precision weights and nothing else is ever written."""
    low = dtype or torch.float32
    models = components.models
    trained = set(trained_parameters(models, spec.method.stages))
    components.vae.to(device).eval()
    if low != torch.float32:  # loaded in fp32; casting to fp32 again only makes diffusers warn
        components.vae.to(low)
    for name, model in models.items():
        model.to(device).eval()
        if low == torch.float32:
            continue
        for pname, param in model.named_parameters():
            if f"{name}.{pname}" not in trained:
                param.data = param.data.to(low)
        for buffer_name, buffer in model.named_buffers():
            if buffer.is_floating_point():
                model.get_buffer(buffer_name).data = buffer.data.to(low)


def add_adapters_and_check_selectors(spec: RunSpec, components: SDComponents) -> None:
    """Put the method's LoRA adapters on; fail fast on a selector that matches nothing (before any image is
    generated or encoded)."""
    models = components.models
    try:
        add_adapters(models, all_stages(spec), spec.seed)
    except SelectorError as e:
        raise ConfigError(f"method {spec.method.name}", [f"lora: {e}"]) from None
    for stage in spec.method.stages:
        try:
            stage_parameters(models, stage)
        except SelectorError as e:
            raise ConfigError(f"method {spec.method.name}", [f"stages.{stage.name}.trainable: {e}"]) from None


def prepare_run(spec: RunSpec, components: SDComponents | None = None, progress: bool = True) -> RunContext:
    """Load and validate everything a run needs; cheap checks first. Bad concept input raises ConceptError
    naming the concept."""
    concept, method = spec.concept, spec.method
    images = load_concept_images(concept.id, concept.images, spec.resolution)
    captions = load_concept_captions(concept.id, concept.images)
    components = components or load_components(spec.model)
    tokenizer = components.tokenizer
    needs = method_needs(spec)
    class_ids = [
        single_token_id(tokenizer, s.super_category, concept.id) if needs.single_token_class else word_ids(tokenizer, s.super_category)[0]
        for s in concept.subjects
    ]
    placeholders = add_subject_tokens(components, method.placeholder, concept)
    add_adapters_and_check_selectors(spec, components)
    check_class_after_placeholder(spec, tokenizer, placeholders, class_ids, needs, [c for c in captions if c])
    device = resolve_device(spec.device)
    dtype = resolve_precision(spec.mixed_precision, device)
    _place_models(components, spec, device, dtype)

    prior_pairs, prior_folder = None, None
    if any(s.use_class_prior for s in method.stages):  # the base model's outputs: new tokens change nothing here
        prior_pairs, prior_folder = class_prior_images(
            components, method.class_prior, [s.super_category for s in concept.subjects], spec.seed, spec.resolution,
            Path(spec.prior_cache_dir) if spec.prior_cache_dir else None, progress,
        )
    instances = cached_instance_bank(
        Path(spec.latent_cache_dir) if spec.latent_cache_dir else None,
        instance_bank_key(spec, components.path),
        lambda: encode_instances(spec, images, components, device),
    )
    priors = None
    if prior_pairs:  # at every shape the instances train at, so that a batch of one shape can hold both
        priors = prior_bank(prior_pairs, sorted(set(instance_shapes(spec, images, components))), components.vae,
                            device, next(components.vae.parameters()).dtype)
    variant_captions = [captions[i // spec.latent_variants] for i in range(len(instances))] if any(captions) else None
    batcher = Batcher(instances, placeholders, templates(method.prompt), priors,
                      method.class_prior.mode if method.class_prior else "concat", variant_captions,
                      method.augmentation_words)
    context = None
    if method.context_prompts:
        context = [i.template for i in load_prompt_set(context_set_for(method.context_prompts, concept.kind))]
    return RunContext(spec, components, placeholders, class_ids, instances, batcher, context, device, dtype, prior_folder,
                      subject_phrase(method, placeholders))


def instance_shapes(spec: RunSpec, images: list, components: SDComponents) -> list[tuple[int, int]]:
    """Each photo's training (width, height): its aspect-ratio bucket with `aspect_buckets`, else the square."""
    step = bucket_step(components.vae, components.unet) if spec.aspect_buckets else None
    if step is not None and spec.resolution % step:
        raise ConfigError("aspect_buckets", [f"resolution {spec.resolution} is not a multiple of {step} px, the side "
                                             f"step of this model's buckets: use {max(step, spec.resolution // step * step)}"])
    return training_shapes(images, spec.resolution, step)


def encode_instances(spec: RunSpec, images: list, components: SDComponents, device) -> LatentBank:
    vae = components.vae
    return instance_bank(images, spec.method.augmentation, instance_shapes(spec, images, components),
                         spec.latent_variants, vae, spec.seed, device, next(vae.parameters()).dtype, concept_masks(spec))


def instance_bank_key(spec: RunSpec, model_path: Path) -> str:
    files = list_image_files(spec.concept.id, spec.concept.images)
    if spec.masked_loss:  # the masks' bytes too: other masks, other loss masks
        files += mask_files(spec)
    preset = spec.method.augmentation + (":buckets" if spec.aspect_buckets else "")
    return bank_key(model_fingerprint(model_path), files, preset, spec.resolution, spec.latent_variants, spec.seed)


def mask_files(spec: RunSpec) -> list[Path]:
    """The concept's mask per photo, for `masked_loss`; ConceptError naming the fix if the folder or a mask is missing."""
    concept = spec.concept
    if concept.masks is None:
        raise ConceptError(concept.id, "masked_loss is on but the concept has no masks folder",
                           "set the concept's masks: FOLDER (one mask per photo, white = subject, same file stem), "
                           "or turn masked_loss off")
    return find_masks(concept.id, concept.masks, [p.name for p in list_image_files(concept.id, concept.images)])


def concept_masks(spec: RunSpec):
    """The photos' masks when the loss is masked to the subject, else None."""
    if not spec.masked_loss:
        return None
    return [read_image(spec.concept.id, path).convert("L") for path in mask_files(spec)]


def check_class_after_placeholder(spec: RunSpec, tokenizer, placeholders: Placeholders, class_ids: list[int | None],
                                  needs: Needs, captions: list[str] = ()) -> None:
    """Methods that read the class token's attention need it right after each placeholder in every training prompt
    (the method's templates and the concept's caption files)."""
    if needs.capture is None or not needs.single_token_class:
        return
    prompts = templates(spec.method.prompt) + [c.replace("{class}", "{super_category}") for c in captions]
    for template in prompts:
        roles = find_roles(tokenize(tokenizer, [placeholders.fill(template)]), placeholders, class_ids)
        missing = [placeholders.strings[j] for j in range(len(class_ids)) if int(roles.super_category[0, j]) < 0]
        if missing:
            raise ConceptError(spec.concept.id, f"training prompt {placeholders.fill(template)!r} has no class word right "
                               f"after {missing}", "name each subject as '<placeholder> <class>' in the method's prompt "
                               "and in caption files ('{placeholder} {class}')")
