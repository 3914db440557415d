"""Measurements on the benchmark's finished runs that two of the papers' claims need beyond the evaluation's
scores: how much of a prompt's attention the placeholder takes (AttnDreamBooth on Textual Inversion), and how
well a model trained on one two-subject photo keeps the subjects apart (DisenDiff against Custom Diffusion)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from microworld.concepts import WorldConcept, write_concepts
from personalize.images import load_concept_images
from personalize.metrics import per_row_mean
from personalize.prompts import load_prompt_set

PROMPTS = "world_eval"
GUIDANCE = 5.0  # the benchmark's evaluation protocol (DDIM, guidance 5)
SEPARATION_COLUMNS = ["method", "concept", "seed", "clip_i_own", "clip_i_other", "separation_clip_i", "dino_own",
                      "dino_other", "separation_dino"]


def finished(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["status"].isin(["finished", "skipped"])]


def attention_shares(frame: pd.DataFrame, steps: int) -> pd.Series:
    """The placeholder's share of word attention (personalize.attention_share) of every finished run, sampled
    once per evaluation prompt with seed 0, indexed like `frame`."""
    from personalize.attention_share import subject_attention_share
    from personalize.sampling import LoadedRun

    templates = [item.template for item in load_prompt_set(PROMPTS)]
    shares = {}
    for index, row in finished(frame).iterrows():
        run = LoadedRun(row["run_dir"], device="cpu")
        shares[index] = subject_attention_share(run, [run.fill(t) for t in templates], 0, steps, GUIDANCE)
    return pd.Series(shares, dtype=float).reindex(frame.index)


def subject_references(folder: Path, subjects: tuple[WorldConcept, ...], scorers) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """CLIP and identity features of each subject's own photos (foreground only), taken alone, not in the pair."""
    from personalize.run_settings import ConceptSpec
    from personalize.scoring import masked_references

    folder = write_concepts(folder, subjects).parent
    references = {}
    for concept in subjects:
        spec = ConceptSpec(id=concept.id, images=str(folder / concept.id), masks=str(folder / f"{concept.id}-masks"),
                           super_category=concept.shape)
        photos = load_concept_images(concept.id, spec.images, resolution=0)
        references[concept.id] = scorers.features(masked_references(spec, photos))
    return references


def subject_separation(frame: pd.DataFrame, subjects: tuple[WorldConcept, ...], folder: Path, samples: int, steps: int,
                       clip: str, identity: str) -> pd.DataFrame:
    """For every finished run trained on the two-subject photo and every subject in it: samples prompted with
    that subject alone ("a photo of a <...-1> star on the beach"), scored against the subject's own photos and
    against the other subject's. The separation is own minus other (CLIP-I and the identity encoder): high when
    asking for one subject draws that subject and not a blend of both. One row per (run, subject); each run's
    samples go to folder/samples/<method>-seed<seed>-<subject>.png, one row per prompt."""
    from personalize.sampling import LoadedRun, generate, image_grid
    from personalize.scoring import Scorers

    if finished(frame).empty:
        return pd.DataFrame(columns=SEPARATION_COLUMNS)
    scorers = Scorers(clip, identity, "cpu")
    references = subject_references(folder, subjects, scorers)
    templates = [item.template for item in load_prompt_set(PROMPTS)]
    rows = []
    for _, row in finished(frame).iterrows():
        run = LoadedRun(row["run_dir"], device="cpu")
        strings, classes = run.placeholders.strings, run.placeholders.super_categories
        if len(strings) != len(subjects):
            raise ValueError(f"{row['run_dir']}: {len(strings)} subjects, expected {len(subjects)}")
        pipe = run.pipeline("ddim")
        for j, concept in enumerate(subjects):
            prompts = [t.replace("{}", f"{strings[j]} {classes[j]}") for t in templates for _ in range(samples)]
            seeds = [k for _ in templates for k in range(samples)]
            images: list[Image.Image] = generate(pipe, prompts, seeds, run.spec.resolution, steps, GUIDANCE)
            grid = folder / "samples" / f"{row['method']}-seed{row['seed']}-{concept.id}.png".replace(" ", "_")
            grid.parent.mkdir(parents=True, exist_ok=True)
            image_grid(images, samples).save(grid)
            clip_f, identity_f = scorers.features(images)
            other = subjects[1 - j].id
            own_clip, other_clip = (float(per_row_mean(clip_f, references[k][0]).mean()) for k in (concept.id, other))
            own_id, other_id = (float(per_row_mean(identity_f, references[k][1]).mean()) for k in (concept.id, other))
            rows.append({"method": row["method"], "concept": f"{row['concept']}/{concept.id}", "seed": row["seed"],
                         "clip_i_own": own_clip, "clip_i_other": other_clip, "separation_clip_i": own_clip - other_clip,
                         "dino_own": own_id, "dino_other": other_id, "separation_dino": own_id - other_id})
    return pd.DataFrame(rows, columns=SEPARATION_COLUMNS)
