"""Identity between a floor and a ceiling: how a concept's raw identity score (CLIP-I, DINO) is read.

A raw identity cosine means little alone (its range depends on the concept and the encoder), so each is read
between two bounds of the same concept, scored the same way: the floor, the base model asked for the class phrase
(personalize.evaluation samples it), and the ceiling, real photos of the subject kept out of training (or, without
them, each reference photo against the others). (score - floor) / (ceiling - floor) is 0 at the base model's level
and 1 at the real photos'.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from personalize.images import list_image_files
from personalize.run_settings import ConceptSpec

log = logging.getLogger(__name__)

IDENTITY_SCORES = {"clip_i": "CLIP-I", "dino": "DINO"}
# A narrower ceiling - floor range would turn differences at the level of rounding into large normalised scores
MIN_IDENTITY_RANGE = 1e-3


def normalised_identity(score: float, floor: float, ceiling: float) -> float:
    """(score - floor) / (ceiling - floor): 0 where the base model already is, 1 where real photos are. NaN when
    the ceiling is not above the floor by MIN_IDENTITY_RANGE (or a value is NaN): no meaningful scale then."""
    if not ceiling - floor >= MIN_IDENTITY_RANGE:
        return float("nan")
    return (score - floor) / (ceiling - floor)


@dataclass
class IdentityBounds:
    """What one concept's identity scores are read against, per score ("clip_i", "dino")."""

    floor: dict[str, float]
    ceiling: dict[str, float]
    floor_folder: Path  # the floor's images, scores and floor.json
    floor_subject: str  # the class phrase the base model was asked for
    ceiling_source: str


def identity_metrics(raw: dict, bounds: IdentityBounds | None, missing_reason: str = "") -> dict:
    """Floor, ceiling and normalised score of CLIP-I and DINO (`<score>_floor`, `_ceiling`, `_norm`), where the
    bounds came from, and a warning for every normalised score left NaN."""
    metrics: dict = {}
    warnings = [missing_reason] if bounds is None else []
    for key, label in IDENTITY_SCORES.items():
        floor = bounds.floor[key] if bounds else float("nan")
        ceiling = bounds.ceiling[key] if bounds else float("nan")
        norm = normalised_identity(raw[key], floor, ceiling)
        metrics.update({f"{key}_floor": floor, f"{key}_ceiling": ceiling, f"{key}_norm": norm})
        if bounds is not None and not ceiling - floor >= MIN_IDENTITY_RANGE:
            warnings.append(f"{label}: the ceiling ({ceiling:.4f}) is not above the floor ({floor:.4f}) by "
                            f"{MIN_IDENTITY_RANGE}; {key}_norm is undefined (NaN)")
    for warning in warnings[1 if bounds is None else 0:]:  # bounds not computed yet is a state, not a problem
        log.warning("identity normalisation: %s", warning)
    return {**metrics, "floor_folder": str(bounds.floor_folder) if bounds else None,
            "floor_subject": bounds.floor_subject if bounds else None,
            "ceiling_source": bounds.ceiling_source if bounds else None, "identity_warnings": warnings}


def ceiling_source(concept: ConceptSpec) -> str:
    """Where a concept's ceiling comes from, with a digest of those photos' bytes: a folder whose photos change
    (added, removed, drawn again) names another source, so an evaluation holding the old ceiling is not reused."""
    folder = concept.holdout or concept.images
    files = list_image_files(concept.id, folder)
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + Path(path).read_bytes())
    what = "held-out photos" if concept.holdout else "reference photos, leave-one-out"
    return f"{len(files)} {what} ({folder}, {digest.hexdigest()[:12]})"


def has_identity_bounds(metrics: dict, concept: ConceptSpec) -> bool:
    """Whether an evaluation's metrics hold a floor and a ceiling, the ceiling from the concept's photos as they
    are now (not NaN for want of them, nor from photos since replaced)."""
    return metrics.get("ceiling_source") is not None and metrics["ceiling_source"] == ceiling_source(concept)
