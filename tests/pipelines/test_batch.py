"""The batch on a local Ray: good runs finish with artifacts and metrics, bad concepts are reported with their
reason, a resubmission skips finished work, and a fault mid-run resumes from the last stage checkpoint."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from pipelines.batch import main
from tests.conftest import draw_concept
from tests.pipelines.conftest import batch_file


def concepts(folder):
    good = draw_concept(folder / "ball", n=3)
    broken = draw_concept(folder / "broken", n=2)
    (broken / "0.png").write_bytes((broken / "0.png").read_bytes()[:150])  # truncated file
    (folder / "empty").mkdir()
    return [{"id": "ball", "images": str(good), "super_category": "ball"},
            {"id": "broken", "images": str(broken), "super_category": "ball"},
            {"id": "empty", "images": str(folder / "empty"), "super_category": "box"}]


def test_batch_finishes_good_runs_reports_bad_concepts_and_skips_finished_work(local_ray, tiny_model, tiny_scorers, tmp_path, capsys):
    storage = tmp_path / "store"
    config = batch_file(tmp_path, tiny_model, tiny_scorers, storage, concepts(tmp_path))
    assert main([config]) == 0
    frame = pd.read_parquet(storage / "results" / "results.parquet")
    assert len(frame) == 6 and set(frame["status"]) == {"finished", "failed"}
    good = frame[frame["concept"] == "ball"]
    assert list(good["status"]) == ["finished", "finished"]
    assert good[["clip_t", "clip_i", "dino"]].notna().all().all()
    for run in good["run_dir"]:
        assert {"DONE.json", "learned_embeds.safetensors", "losses.csv", "samples.png"} <= {p.name for p in Path(run).iterdir()}
    bad = frame[frame["concept"] != "ball"].set_index("concept")
    assert "concept 'broken': 0.png cannot be read" in bad.loc["broken", "reason"].iloc[0]
    assert "concept 'empty'" in bad.loc["empty", "reason"].iloc[0] and "is empty" in bad.loc["empty", "reason"].iloc[0]
    markdown = (storage / "results" / "results.md").read_text()
    assert "| ball | textual_inversion | finished |" in markdown and "concept 'empty'" in markdown
    assert (storage / "results" / "comparison" / "scatter.png").is_file()
    assert "| broken | rare_two_stage | failed |" in capsys.readouterr().out

    losses = {run: (Path(run) / "losses.csv").read_text() for run in good["run_dir"]}
    stamps = {run: (Path(run) / "losses.csv").stat().st_mtime_ns for run in good["run_dir"]}
    assert main([config]) == 0  # resubmitted: nothing finished is trained again
    again = pd.read_parquet(storage / "results" / "results.parquet")
    assert list(again[again["concept"] == "ball"]["status"]) == ["skipped", "skipped"]
    for run in good["run_dir"]:
        path = Path(run) / "losses.csv"
        assert path.read_text() == losses[run] and path.stat().st_mtime_ns == stamps[run]
    assert again[again["concept"] == "ball"][["clip_t", "dino"]].notna().all().all()  # evaluation reused


def test_every_run_failing_is_a_non_zero_exit(local_ray, tiny_model, tiny_scorers, tmp_path):
    (tmp_path / "empty").mkdir()
    config = batch_file(tmp_path, tiny_model, tiny_scorers, tmp_path / "store",
                        [{"id": "empty", "images": str(tmp_path / "empty"), "super_category": "box"}])
    assert main([config]) == 1
    assert main([config, "resources.gpus_per_run=-1"]) == 2  # an invalid config


def test_a_fault_mid_run_resumes_from_the_last_stage_checkpoint(local_ray, tiny_model, tiny_scorers, tmp_path, monkeypatch):
    images = draw_concept(tmp_path / "ball", n=3)
    concept = [{"id": "ball", "images": str(images), "super_category": "ball"}]
    clean = batch_file(tmp_path / "a", tiny_model, tiny_scorers, tmp_path / "a" / "store", concept, methods=["rare_two_stage"],
                       evaluation=None)
    assert main([clean]) == 0
    monkeypatch.setenv("PERSONALIZE_INJECT_FAULT", f"model:1:{tmp_path / 'fault-marker'}")
    faulty = batch_file(tmp_path / "b", tiny_model, tiny_scorers, tmp_path / "b" / "store", concept, methods=["rare_two_stage"],
                        evaluation=None)
    assert main([faulty]) == 0
    assert (tmp_path / "fault-marker").is_file()  # the fault did happen, in the second stage
    run_a = next((tmp_path / "a" / "store" / "runs" / "ball").iterdir())
    run_b = next((tmp_path / "b" / "store" / "runs" / "ball").iterdir())
    a, b = load_file(str(run_a / "learned_embeds.safetensors")), load_file(str(run_b / "learned_embeds.safetensors"))
    assert torch.equal(a["(rare)"], b["(rare)"])
    ua, ub = load_file(str(run_a / "unet.safetensors")), load_file(str(run_b / "unet.safetensors"))
    assert all(torch.equal(ua[k], ub[k]) for k in ua)
    ray_runs = list((tmp_path / "b" / "store" / "ray").iterdir())
    assert any((r / "stage-00-token").is_dir() for r in ray_runs)  # the stage checkpoint Ray kept
    done = json.loads((run_b / "DONE.json").read_text())
    assert set(done["stages"]) == {"token", "model"}
