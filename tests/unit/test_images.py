"""Concept images: accepted formats and conversions, and every rejection naming concept, file and reason."""

import numpy as np
import pytest
from PIL import Image

from personalize.errors import ConceptError
from personalize.images import load_concept_images, to_rgb


def test_modes_are_converted_to_8_bit_rgb():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("LA", (4, 4), (100, 255))).getpixel((0, 0)) == (100, 100, 100)
    p = Image.new("P", (4, 4))
    p.putpalette([10, 20, 30] * 256)
    assert to_rgb(p).getpixel((0, 0)) == (10, 20, 30)
    assert to_rgb(Image.new("CMYK", (4, 4), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_rgb(sixteen).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))).getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "a.jpg"
    im.save(path, exif=exif)
    (loaded,) = load_concept_images("c", tmp_path, resolution=16)
    assert loaded.size == (20, 40)
    r, g, b = loaded.getpixel((10, 2))  # the red strip is now at the top
    assert r > 200 and b < 60


def test_accepts_jpg_png_webp(tmp_path):
    for i, fmt in enumerate(["JPEG", "PNG", "WEBP"]):
        Image.new("RGB", (64, 64), (i * 50, 10, 10)).save(tmp_path / f"{i}.{fmt.lower().replace('jpeg', 'jpg')}", fmt)
    assert len(load_concept_images("c", tmp_path, resolution=64)) == 3


def expect_rejection(folder, match, concept="my-dog", resolution=64):
    with pytest.raises(ConceptError, match=match) as err:
        load_concept_images(concept, folder, resolution)
    assert f"concept '{concept}'" in str(err.value)
    assert err.value.fix
    return err.value


def test_missing_and_empty_folders(tmp_path):
    expect_rejection(tmp_path / "nope", "does not exist")
    (tmp_path / "empty").mkdir()
    expect_rejection(tmp_path / "empty", "is empty")


def test_truncated_image_names_the_file(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "good.png")
    data = (tmp_path / "good.png").read_bytes()
    Image.new("RGB", (80, 80), (9, 9, 9)).save(tmp_path / "cut.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "cut.jpg").read_bytes()[:200])
    err = expect_rejection(tmp_path, "cut.jpg cannot be read")
    assert "truncated" in err.fix
    assert data  # the good file is untouched


def test_non_image_files(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    (tmp_path / "notes.pdf").write_text("hello")
    expect_rejection(tmp_path, r"not images: \['notes.pdf'\]")
    (tmp_path / "notes.pdf").unlink()
    (tmp_path / "fake.png").write_text("this is text")
    expect_rejection(tmp_path, "fake.png cannot be read")


def test_images_smaller_than_half_the_resolution(tmp_path):
    Image.new("RGB", (300, 200)).save(tmp_path / "small.png")
    expect_rejection(tmp_path, r"small.png is 300x200, smaller than half the training resolution \(256", resolution=512)
    assert load_concept_images("c", tmp_path, resolution=400)
