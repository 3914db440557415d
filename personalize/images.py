"""Reading and validating concept images: every rejection names the concept, the file and the reason."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from personalize.errors import ConceptError
from personalize.storage import is_s3, localize

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
CAPTION_SUFFIXES = {".txt"}


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied; RGBA/LA/P/CMYK/16-bit/float converted to 8-bit RGB (transparency onto white)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit: 0..65535 -> 0..255
        arr = np.asarray(image, dtype=np.float32)
        arr = arr / 257.0 if arr.max() > 255 else arr
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        arr = np.asarray(image, dtype=np.float32)
        image = Image.fromarray(np.clip(arr / max(float(arr.max()), 1e-8) * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def list_image_files(concept_id: str, folder: str | Path) -> list[Path]:
    """The image files of a folder, sorted (IMAGE.txt captions beside them are allowed, not listed)."""
    if is_s3(folder):
        try:
            folder = localize(str(folder))
        except FileNotFoundError:
            raise ConceptError(concept_id, f"nothing is stored under {folder}", "upload 3-6 photos there") from None
    folder = Path(folder)
    if not folder.exists():
        raise ConceptError(concept_id, f"image folder {folder} does not exist", "point `images` at a folder of 3-6 photos")
    if not folder.is_dir():
        raise ConceptError(concept_id, f"{folder} is not a folder", "point `images` at a folder of photos")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    allowed = IMAGE_SUFFIXES | CAPTION_SUFFIXES
    others = [p.name for p in files if p.suffix.lower() not in allowed]
    if others:
        raise ConceptError(concept_id, f"{folder} holds files that are not images: {others[:5]}",
                           "remove them or move them out of the folder (accepted: jpg, png, webp, and IMAGE.txt captions)")
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise ConceptError(concept_id, f"image folder {folder} is empty", "add 3-6 photos of the subject")
    return images


def read_image(concept_id: str, path: Path, min_side: int = 0) -> Image.Image:
    try:
        with Image.open(path) as handle:
            handle.load()
            image = to_rgb(handle)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ConceptError(concept_id, f"{path.name} cannot be read as an image ({e})",
                           "replace or remove the file (it may be truncated or not an image)") from None
    if min(image.size) < min_side:
        raise ConceptError(concept_id, f"{path.name} is {image.size[0]}x{image.size[1]}, smaller than half the training "
                           f"resolution ({min_side} px on the short side)", "use larger photos or a lower resolution")
    return image


def load_concept_images(concept_id: str, folder: str | Path, resolution: int) -> list[Image.Image]:
    """All images of a concept, validated; raises ConceptError on the first bad file."""
    return [read_image(concept_id, p, min_side=resolution // 2)
            for p in list_image_files(concept_id, folder)]


CAPTION_SLOTS = ("{placeholder}", "{class}")
APPEARANCE = set("""red orange yellow green blue purple violet pink brown black white grey gray golden gold silver beige
teal turquoise cyan magenta maroon navy striped stripes stripy spotted spots dotted dots polka checkered checked plaid
tartan furry fluffy shiny glossy matte wooden metal metallic plastic glass ceramic leather woolen knitted""".split())
ARTICLES = {"a", "an", "the", "my", "our", "this", "that"}
BOUNDARIES = {"on", "in", "at", "under", "over", "near", "by", "beside", "behind", "next", "inside", "and", "of"}


def appearance_words(caption: str) -> list[str]:
    """Colour, pattern and material words describing the subject in a caption: before {placeholder} back to its
    article, between it and {class}, and in a 'with ...' right after them (up to the next preposition). Words
    about the scene ('on the green grass') are not the subject's."""
    words = caption.replace(",", " ").split()
    if "{placeholder}" not in words:
        return []
    at = words.index("{placeholder}")
    found = []
    i = at - 1
    while i >= 0 and words[i].lower() not in ARTICLES | BOUNDARIES:
        found.append(words[i])
        i -= 1
    j = at + 1
    while j < len(words) and words[j] != "{class}" and words[j].lower() not in BOUNDARIES | {"with"}:
        found.append(words[j])
        j += 1
    j += 1 if j < len(words) and words[j] == "{class}" else 0
    if j < len(words) and words[j].lower() == "with":
        j += 1
        while j < len(words) and words[j].lower() not in BOUNDARIES:
            found.append(words[j])
            j += 1
    return [w for w in found if w.lower().strip(".!?") in APPEARANCE]


def load_concept_captions(concept_id: str, folder: str | Path) -> list[str | None]:
    """Each image's own training caption, from IMAGE.txt beside it (None where there is none), in image order. A
    caption names the subject with {placeholder} (its token) and may name its {class}; nothing else in braces."""
    images = list_image_files(concept_id, folder)
    folder = images[0].parent
    stems = {p.stem for p in images}
    orphans = sorted(p.name for p in folder.glob("*.txt") if p.stem not in stems and not p.name.startswith("."))
    if orphans:
        raise ConceptError(concept_id, f"captions without an image: {orphans[:5]}",
                           "name each caption after its image (photo.png -> photo.txt) or remove it")
    captions = []
    for path in images:
        caption_file = path.with_suffix(".txt")
        if not caption_file.is_file():
            captions.append(None)
            continue
        caption = caption_file.read_text().strip()
        rest = caption
        for slot in CAPTION_SLOTS:
            rest = rest.replace(slot, "")
        if "{placeholder}" not in caption or "{" in rest or "}" in rest:
            raise ConceptError(concept_id, f"caption {caption_file.name} reads {caption!r}",
                               "name the subject with {placeholder} (and its class with {class}, if at all); "
                               "no other braces")
        details = appearance_words(caption)
        if details:
            log.warning("concept %r: caption %s describes the subject's own look (%s): the token learns only what "
                        "captions leave out, so leave the subject's colours, patterns and materials to it",
                        concept_id, caption_file.name, ", ".join(details))
        captions.append(caption)
    return captions


def find_masks(concept_id: str, folder: str | Path, names: list[str]) -> list[Path]:
    """The mask file of each image (matched by file stem); ConceptError naming the images without one."""
    folder = localize(str(folder)) if is_s3(folder) else Path(folder)
    masks = {p.stem: p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES} if folder.is_dir() else {}
    missing = [n for n in names if Path(n).stem not in masks]
    if missing:
        raise ConceptError(concept_id, f"mask folder {folder} lacks masks for {missing}", "add one mask per image, same file stem")
    return [masks[Path(n).stem] for n in names]


def load_masks(concept_id: str, folder: str | Path, names: list[str]) -> list[Image.Image]:
    """Foreground masks (white = subject), one per image, matched by file stem."""
    return [read_image(concept_id, path).convert("L") for path in find_masks(concept_id, folder, names)]


def load_captioned_folder(folder: str | Path, default_caption: str) -> list[tuple[Image.Image, str]]:
    """Real regularisation images with captions: IMAGE.txt beside each image, else `default_caption`."""
    pairs = []
    for path in list_image_files("class-prior", folder):
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.is_file() else default_caption
        pairs.append((read_image("class-prior", path), caption))
    return pairs
