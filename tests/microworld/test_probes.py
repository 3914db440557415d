"""The two measurements behind the attention and two-subject claims: the placeholder's share of word attention,
pinned on hand-made maps, and both probes run on short world runs trained here (DreamBooth and Textual
Inversion; DisenDiff and Custom Diffusion on one two-subject photo)."""

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from microworld.concepts import CONCEPTS, write_pair
from microworld.probes import attention_shares, subject_separation
from microworld.quality import PAIR_BASELINE_OVERRIDES
from personalize.attention_share import class_word_positions, placeholder_share, word_positions
from personalize.config import resolve_runs
from personalize.loop import run_method
from personalize.run_settings import ExperimentConfig

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models" / "microworld"


def test_the_share_is_the_placeholders_part_of_the_attention_on_words():
    # one sample, two image positions, keys: SOT, "a", placeholder, "star", EOT, pad
    probs = torch.tensor([[[0.5, 0.1, 0.2, 0.1, 0.1, 0.0],    # words get 0.4, the placeholder 0.2 -> 1/2
                           [0.2, 0.3, 0.1, 0.2, 0.1, 0.1]]])  # words get 0.6, the placeholder 0.1 -> 1/6
    layers = {"down": probs, "up": probs.flip(1)}
    assert placeholder_share(layers, [[2]], [[1, 2, 3]]) == pytest.approx((0.5 + 1 / 6) / 2)
    # several vectors count together; samples and layers are averaged
    two = torch.cat([probs, probs])
    assert placeholder_share({"a": two}, [[2], [2, 3]], [[1, 2, 3]] * 2) == pytest.approx(((0.5 + 1 / 6) / 2 + (0.75 + 0.5) / 2) / 2)
    with pytest.raises(ValueError, match="placeholder is not in its prompt"):
        placeholder_share({"a": probs}, [[]], [[1, 2, 3]])


def test_word_positions_leave_out_start_end_and_padding():
    assert word_positions([49406, 320, 1125, 539, 49407, 49407, 49407], eos_id=49407) == [1, 2, 3]
    assert word_positions([49406, 320, 1125, 49407, 0, 0], eos_id=49407) == [1, 2]  # SD 2's "!" padding


def test_the_class_word_after_the_placeholder_is_found_and_no_other():
    # "a photo of sks star and a star": only the star right after sks is the subject's class word
    ids = [49406, 320, 1125, 539, 48136, 1565, 537, 320, 1565, 49407]
    assert class_word_positions(ids, [[48136]], [[1565]]) == {5}
    assert class_word_positions(ids, [[48136]], [[320, 1125]]) == set()  # a two-token word must follow whole
    assert class_word_positions([49406, 1, 2, 7, 8, 9, 49407], [[1, 2], [8]], [[7], [9]]) == {3, 5}


def train(tmp_path: Path, method: str, concepts, overrides: dict, name: str) -> str:
    experiment = ExperimentConfig(
        model=str(MODELS / "model"), method=method, concepts=concepts, output_dir=str(tmp_path / f"runs-{name}"),
        resolution=64, latent_variants=1, seed=0, prior_cache_dir=str(tmp_path / "priors"), overrides=overrides,
        samples={"prompts": ["a photo of a {subject}"], "seeds": [0], "steps": 2, "heatmaps": False, "every_stage": False},
    )
    spec = resolve_runs(experiment)[0]
    run_method(spec, progress=False)
    return str(spec.run_dir)


PRIORS = {"class_prior.num_images": 2, "class_prior.inference_steps": 2}


def test_both_probes_measure_short_world_runs(tmp_path):
    pair = write_pair(tmp_path / "concepts", CONCEPTS[0], CONCEPTS[1])
    manifest = tmp_path / "concepts" / "pair.yaml"
    manifest.write_text(yaml.safe_dump({"concepts": [pair]}))
    runs = [{"method": "disendiff", "run_dir": train(tmp_path, "disendiff", str(manifest), {"stages.calibrate.steps": 2, **PRIORS}, "dd")},
            {"method": "custom_diffusion (two subjects)",
             "run_dir": train(tmp_path, "custom_diffusion", str(manifest), {"stages.kv.steps": 2, **PRIORS, **PAIR_BASELINE_OVERRIDES}, "cd")}]
    frame = pd.DataFrame([{**r, "status": "finished", "concept": pair["id"], "seed": 0} for r in runs])

    separation = subject_separation(frame, (CONCEPTS[0], CONCEPTS[1]), tmp_path / "subjects", samples=1, steps=2,
                                    clip=str(MODELS / "clip"), identity=str(MODELS / "identity"))
    assert separation["concept"].tolist() == [f"{pair['id']}/{c.id}" for c in CONCEPTS[:2]] * 2  # runs x subjects
    assert separation["method"].tolist() == ["disendiff"] * 2 + ["custom_diffusion (two subjects)"] * 2
    assert separation[["clip_i_own", "clip_i_other", "dino_own", "dino_other"]].notna().all().all()
    # a subject's own photos and the other's are different references: the scores differ
    assert (separation["clip_i_own"] != separation["clip_i_other"]).all()
    assert len(list((tmp_path / "subjects" / "samples").glob("*.png"))) == 4  # a grid per run and subject


def test_the_attention_share_of_short_dreambooth_and_textual_inversion_runs(tmp_path):
    from microworld.concepts import write_concepts

    manifest = write_concepts(tmp_path / "concepts", CONCEPTS[:1])
    runs = [train(tmp_path, "textual_inversion", str(manifest), {"stages.embedding.steps": 2}, "ti"),
            train(tmp_path, "dreambooth", str(manifest), {"stages.finetune.steps": 2, **PRIORS}, "db")]
    frame = pd.DataFrame({"run_dir": runs, "status": ["finished", "failed"]}, index=[3, 7])
    shares = attention_shares(frame, steps=2)
    assert shares.index.tolist() == [3, 7] and 0 < shares[3] < 1 and pd.isna(shares[7])  # a failed run: nothing
    both = attention_shares(frame.assign(status="finished"), steps=2)
    assert both[3] == pytest.approx(shares[3]) and both[3] != both[7]  # the same run measures the same
