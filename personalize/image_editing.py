"""img2img and inpainting with a run's learned state: the learned subject put into a photo.

Inpainting keeps the photo outside the mask by blending after every denoising step: there the latents are the
photo's, re-noised to the next step's level (the original Stable Diffusion inpainting of a text-to-image UNet).
diffusers' inpainting pipeline does exactly this for 4-channel UNets; a UNet with other latent channels (the micro
world's 8) gets the same blending from a step callback of the img2img pipeline, which diffusers' channel check
would otherwise refuse.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from personalize.sampling import autocast_if_mixed, build_pipeline, prompts_as_written


def build_edit_pipeline(components, scheduler: str = "ddim", inpaint: bool = False):
    """An img2img pipeline over the same modules; with `inpaint` and a 4-channel UNet diffusers' inpainting one."""
    from diffusers import (
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
    )

    base = build_pipeline(components, scheduler)
    inpainting = inpaint and components.unet.config.in_channels == 4
    if components.is_sdxl:
        cls = StableDiffusionXLInpaintPipeline if inpainting else StableDiffusionXLImg2ImgPipeline
        pipe = cls(**base.components)
    else:
        cls = StableDiffusionInpaintPipeline if inpainting else StableDiffusionImg2ImgPipeline
        pipe = cls(**base.components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return prompts_as_written(pipe)


class KeepOutsideMask:
    """A step callback of the img2img pipeline: after each step, the latents outside the mask are the photo's,
    re-noised to the next step (after the last, the photo's own)."""

    def __init__(self, pipe, photo: Image.Image, mask: Image.Image, seed: int):
        vae = pipe.vae
        pixels = pipe.image_processor.preprocess(photo).to(vae.device, vae.dtype)
        self.photo = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
        repaint = torch.from_numpy((np.asarray(mask.convert("L"), dtype=np.float32) >= 128).astype(np.float32))
        self.keep = 1.0 - F.interpolate(repaint[None, None], size=self.photo.shape[-2:], mode="nearest").to(self.photo)
        self.noise = torch.randn(self.photo.shape, generator=torch.Generator("cpu").manual_seed(int(seed))).to(self.photo)

    def __call__(self, pipe, index: int, timestep, kwargs: dict) -> dict:
        latents = kwargs["latents"]
        schedule = pipe.scheduler.timesteps
        following = (schedule == timestep).nonzero().flatten()
        position = int(following[0]) + 1 if len(following) else len(schedule)
        photo = self.photo if position >= len(schedule) else \
            pipe.scheduler.add_noise(self.photo, self.noise, schedule[position : position + 1])
        return {"latents": self.keep * photo.to(latents.dtype) + (1.0 - self.keep) * latents}


@torch.no_grad()
def generate_from_image(pipe, prompts: Sequence[str], seeds: Sequence[int], image: Image.Image, resolution: int,
                        mask: Image.Image | None = None, strength: float = 0.75, steps: int = 50,
                        guidance_scale: float = 7.5) -> list[Image.Image]:
    """One image per (prompt, seed) pair, each starting from `image` (and repainting only `mask`'s white part)."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}: the share of the steps that repaint the image")
    init = image.convert("RGB").resize((resolution, resolution))
    mask = mask.convert("L").resize((resolution, resolution)) if mask is not None else None
    images = []
    for prompt, seed in zip(prompts, seeds):
        extra = {}
        if isinstance(pipe, (StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline)):
            extra = {"mask_image": mask, "height": resolution, "width": resolution}
        elif mask is not None:
            extra = {"callback_on_step_end": KeepOutsideMask(pipe, init, mask, seed),
                     "callback_on_step_end_tensor_inputs": ["latents"]}
        with autocast_if_mixed(pipe):
            out = pipe(prompt=prompt, image=init, strength=strength, num_inference_steps=steps,
                       guidance_scale=guidance_scale, generator=torch.Generator("cpu").manual_seed(int(seed)), **extra)
        images.append(out.images[0])
    return images
