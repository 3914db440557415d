"""Image generation: pipelines rebuilt from components, deterministic (prompt x seed) grids."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from tqdm.auto import tqdm

SCHEDULERS = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}


def build_pipeline(components, scheduler: str = "ddim") -> StableDiffusionPipeline:
    """A pipeline over the given (possibly personalised) modules; nothing is copied."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; available: {', '.join(SCHEDULERS)}")
    sched = SCHEDULERS[scheduler].from_config(components.noise_scheduler.config)
    parts = {"vae": components.vae, "text_encoder": components.text_encoder, "tokenizer": components.tokenizer,
             "unet": components.unet, "scheduler": sched}
    if components.is_sdxl:
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=components.text_encoder_2,
                                         tokenizer_2=components.tokenizer_2)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return prompts_as_written(pipe)


def prompts_as_written(pipe):
    """The pipeline encodes prompts as given. Ours already name every vector of a placeholder ("<c> <c>_1 <c>_2"),
    as training tokenised them; diffusers' textual-inversion expansion, meant for prompts naming the first token
    only, would add the vectors again at every match ("<c> <c>_1 <c>_2 <c> <c>_1 <c>_2_1 ...")."""
    pipe.maybe_convert_prompt = lambda prompt, tokenizer: prompt
    return pipe


@torch.no_grad()
def generate(pipe: StableDiffusionPipeline, prompts: Sequence[str], seeds: Sequence[int], resolution: int,
             steps: int = 25, guidance_scale: float = 7.5, batch_size: int = 8, eta: float = 0.0,
             progress: bool = False) -> list[Image.Image]:
    """One image per (prompt, seed) pair, in order. Each image's noise, the starting latents and, for a stochastic
    sampler (DDIM with eta > 0), every step's, comes from its own seed only, so a picture is the same in every
    call and whatever else shares its batch (up to float rounding of batched kernels)."""
    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds must pair up")
    device = pipe.unet.device
    images: list[Image.Image] = []
    chunks = range(0, len(prompts), batch_size)
    for start in tqdm(chunks, desc="sampling", disable=not progress, leave=False):
        p = list(prompts[start : start + batch_size])
        s = list(seeds[start : start + batch_size])
        gens = [torch.Generator("cpu").manual_seed(int(x)) for x in s]
        shape = (pipe.unet.config.in_channels, resolution // pipe.vae_scale_factor, resolution // pipe.vae_scale_factor)
        latents = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device, pipe.unet.dtype)
        kwargs = {"eta": eta} if isinstance(pipe.scheduler, DDIMScheduler) else {}
        with autocast_if_mixed(pipe):
            out = pipe(p, height=resolution, width=resolution, num_inference_steps=steps, guidance_scale=guidance_scale,
                       latents=latents, generator=gens, output_type="pil", **kwargs)
        images += out.images
    return images


def autocast_if_mixed(pipe):
    """Modules kept in different dtypes (trained fp32 UNet, bf16 VAE) run under autocast; modules all in one
    dtype run without it (autocast would run their normalisations in fp32 and cast around every op)."""
    import contextlib

    dtypes = {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder)}
    if len(dtypes) == 1:
        return contextlib.nullcontext()
    return torch.autocast(pipe.unet.device.type, dtype=(dtypes - {torch.float32}).pop())


def subject_phrase(method, placeholders) -> str:
    """How the subject is named at inference, the way the method trained it: '[V]', '[V] dog' or
    '[V1] cat and [V2] dog'."""
    from personalize.prompts import templates

    first = templates(method.prompt)[0]
    if "{subjects}" in first:
        return placeholders.fill("{subjects}")
    if "{super_category}" in first:
        return placeholders.fill("{placeholder} {super_category}")
    return placeholders.strings[0]


def write_sample_grid(ctx, path) -> None:
    """The run's small grid: one row per sample prompt, one column per seed."""
    spec = ctx.spec.samples
    subject = subject_phrase(ctx.spec.method, ctx.placeholders)
    prompts = [p.replace("{subject}", subject) for p in spec.prompts]
    pipe = build_pipeline(ctx.components, spec.scheduler)
    pairs = [(p, s) for p in prompts for s in spec.seeds]
    images = generate(pipe, [p for p, _ in pairs], [s for _, s in pairs], ctx.spec.resolution, spec.steps, spec.guidance_scale)
    image_grid(images, len(spec.seeds), prompts).save(path)


def image_grid(images: Sequence[Image.Image], columns: int, labels: Sequence[str] | None = None) -> Image.Image:
    """Images in a grid, row-major; optional row labels drawn above each row."""
    from PIL import ImageDraw

    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    label_h = 12 if labels else 0
    grid = Image.new("RGB", (columns * w, rows * (h + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid.paste(image, (c * w, r * (h + label_h) + label_h))
        if labels and c == 0 and r < len(labels):
            draw.text((2, r * (h + label_h)), labels[r][: max(8, columns * w // 6)], fill=(0, 0, 0))
    return grid



# --------------------------------------------------------------------------------------------
# Personalised pipelines rebuilt from a run folder


@contextmanager
def _without_notice(logger: str, starts: str):
    """Drop one known, harmless log message (and nothing else) while loading."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(starts)

    target = logging.getLogger(logger)
    target.addFilter(keep)
    try:
        yield
    finally:
        target.removeFilter(keep)


class LoadedRun:
    """A finished run on top of its base model: placeholder rows, trained UNet modules and LoRA adapters (through
    diffusers' own LoRA loader, as a user of the files would) applied in place."""

    def __init__(self, run_dir, device: str = "auto", components=None):
        import json
        from pathlib import Path

        from personalize.devices import resolve_device
        from personalize.errors import RunStateError
        from personalize.export import LORA, PLACEHOLDERS, load_embeddings, load_unet_weights
        from personalize.models import load_components
        from personalize.run_folder import finished_spec
        from personalize.tokens import add_subject_tokens, restore_joined_rows

        self.run_dir = Path(run_dir)
        self.spec = finished_spec(self.run_dir)
        self.components = components or load_components(self.spec.model)
        comps = self.components
        self.placeholders = add_subject_tokens(comps, self.spec.method.placeholder, self.spec.concept)
        embeds = load_embeddings(self.run_dir)
        self.trained_rows = None  # each vector's rows of every text encoder, joined
        if self.placeholders.learned:
            self.trained_rows = torch.cat([embeds[tokens[0]] for tokens in self.placeholders.tokens])
            restore_joined_rows(comps, self.trained_rows)
        unet = load_unet_weights(self.run_dir)
        if unet:
            missing = set(unet) - set(comps.unet.state_dict())
            if missing:
                raise RunStateError(f"{self.run_dir}: UNet weights do not fit the base model (e.g. {sorted(missing)[:2]})")
            comps.unet.load_state_dict(unet, strict=False)
        if (self.run_dir / LORA).is_file():
            with _without_notice("diffusers.loaders.lora_base", "No LoRA keys associated to"):  # a UNet-only LoRA
                build_pipeline(comps).load_lora_weights(self.run_dir, weight_name=LORA)
        self.subject = json.loads((self.run_dir / PLACEHOLDERS).read_text())["subject"]
        self.device = resolve_device(device)
        for module in (comps.vae, *comps.models.values()):
            module.to(self.device).eval()

    def fill(self, prompt: str) -> str:
        """`{}` in a prompt stands for the subject, named the way the method trained it."""
        return prompt.replace("{}", self.subject)

    def pipeline(self, scheduler: str = "ddim") -> StableDiffusionPipeline:
        return build_pipeline(self.components, scheduler)
