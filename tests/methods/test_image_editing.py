"""`personalize sample --image [--mask]`: img2img and inpainting with a run's learned state (a LoRA run and a
learned-token run), through the command line a user calls."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from personalize.cli import main


def photo_and_mask(folder):
    photo = Image.new("RGB", (64, 64), (30, 90, 200))
    photo.paste((240, 200, 40), (8, 8, 56, 56))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # repaint the left half only
    photo.save(folder / "photo.png")
    mask.save(folder / "mask.png")
    return folder / "photo.png", folder / "mask.png"


def pictures(out, seeds=(0, 1)) -> list[np.ndarray]:
    return [np.asarray(Image.open(out / f"prompt00-seed{s}.png"), dtype=np.float32) / 255 for s in seeds]


@pytest.mark.parametrize("which", ["lora_run", "custom_diffusion_run"])
def test_img2img_starts_from_the_photo_and_inpainting_keeps_what_the_mask_leaves(which, request, tmp_path):
    run = request.getfixturevalue(which).run_dir
    photo, mask = photo_and_mask(tmp_path)
    common = ["sample", str(run), "--prompt", "a {} on the beach", "--seeds", "0", "1", "--steps", "4", "--device", "cpu"]

    assert main([*common, "--image", str(photo), "--strength", "0.5", "--out", str(tmp_path / "i2i")]) == 0
    assert main([*common, "--image", str(photo), "--strength", "1.0", "--out", str(tmp_path / "i2i-full")]) == 0
    start = np.asarray(Image.open(photo), dtype=np.float32) / 255
    half, full = pictures(tmp_path / "i2i"), pictures(tmp_path / "i2i-full")
    # less strength keeps more of the photo
    assert np.abs(half[0] - start).mean() < np.abs(full[0] - start).mean()
    assert half[0].shape == (64, 64, 3) and not np.array_equal(half[0], half[1])

    assert main([*common, "--image", str(photo), "--mask", str(mask), "--strength", "1.0", "--out", str(tmp_path / "inpaint")]) == 0
    a, b = pictures(tmp_path / "inpaint")
    left, right = np.abs(a - b)[:, :24].mean(), np.abs(a - b)[:, 40:].mean()
    assert left > 3 * right  # the seeds repaint the masked half differently; the other half is the photo's in both


def test_bad_edit_arguments_fail_before_any_model_is_loaded(lora_run, tmp_path, capsys):
    photo, _ = photo_and_mask(tmp_path)
    assert main(["sample", str(lora_run.run_dir), "--prompt", "a {}", "--mask", str(photo)]) == 2
    assert "--mask needs --image" in capsys.readouterr().err
    assert main(["sample", str(lora_run.run_dir), "--prompt", "a {}", "--image", str(photo), "--strength", "1.5"]) == 2
    assert "--strength must be in (0, 1]" in capsys.readouterr().err
    assert main(["sample", str(lora_run.run_dir), "--prompt", "a {}", "--image", str(tmp_path / "none.png")]) == 2
    assert "none.png: no such file" in capsys.readouterr().err


def test_the_blending_callback_keeps_the_photos_latents_outside_the_mask(lora_run, tmp_path):
    """The inpainting path of UNets whose latent channels diffusers' inpainting pipeline refuses (the world's 8):
    img2img with a step callback. After the last step the latents outside the mask are exactly the photo's."""
    import torch

    from personalize.image_editing import KeepOutsideMask, build_edit_pipeline, generate_from_image
    from personalize.sampling import LoadedRun

    run = LoadedRun(lora_run.run_dir, device="cpu")
    pipe = build_edit_pipeline(run.components, "ddim", inpaint=False)  # img2img: the callback does the blending
    photo_path, mask_path = photo_and_mask(tmp_path)
    photo, mask = Image.open(photo_path), Image.open(mask_path)
    seen = []

    class Spy(KeepOutsideMask):
        def __call__(self, pipe, index, timestep, kwargs):
            out = super().__call__(pipe, index, timestep, kwargs)
            seen.append((self.photo, self.keep, out["latents"]))
            return out

    import personalize.image_editing as editing

    original = editing.KeepOutsideMask
    editing.KeepOutsideMask = Spy
    try:
        images = generate_from_image(pipe, [run.fill("a {} on the beach")], [0], photo, 64, mask, strength=1.0, steps=4)
    finally:
        editing.KeepOutsideMask = original
    photo_latents, keep, final = seen[-1]
    assert len(seen) == 4 and images[0].size == (64, 64)
    assert keep.sum() > 0 and (1 - keep).sum() > 0  # both halves present at the latents' resolution
    assert torch.equal(final * keep, photo_latents * keep)
    assert not torch.allclose(final * (1 - keep), photo_latents * (1 - keep))


@pytest.mark.parametrize("method", ["textual_inversion", "dreambooth", "disendiff"])
def test_img2img_and_inpainting_take_every_kind_of_learned_state(method, spec_for, tmp_path):
    """Token rows only, a whole UNet's weights, several subjects' tokens with cross-attention weights (the LoRA and
    Custom Diffusion runs above cover adapters and one token with k/v)."""
    from personalize.loop import run_method

    spec = spec_for(method)
    assert run_method(spec, progress=False).status == "finished"
    photo, mask = photo_and_mask(tmp_path)
    common = ["sample", str(spec.run_dir), "--prompt", "a {} on the beach", "--seeds", "0", "1", "--steps", "2",
              "--device", "cpu", "--image", str(photo)]
    assert main([*common, "--out", str(tmp_path / "i2i")]) == 0
    assert main([*common, "--mask", str(mask), "--strength", "1.0", "--out", str(tmp_path / "inpaint")]) == 0
    first, second = pictures(tmp_path / "i2i")
    assert first.shape == (64, 64, 3) and not np.array_equal(first, second)
    a, b = pictures(tmp_path / "inpaint")
    assert np.abs(a - b)[:, :24].mean() > 3 * np.abs(a - b)[:, 40:].mean()  # only the masked half is repainted
