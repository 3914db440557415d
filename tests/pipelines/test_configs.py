"""The committed batch and sweep configs validate, and their relative model and scorer paths resolve against
the config file (not the working directory of whatever process reads them)."""

from pathlib import Path

import pytest

from personalize.locations import CONFIG_ROOT
from pipelines.config import load_batch
from tuning.config import load_sweep

BATCHES = sorted((CONFIG_ROOT / "batch").glob("*.yaml"))
SWEEPS = sorted((CONFIG_ROOT / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", BATCHES, ids=lambda p: p.name)
def test_batch_configs_resolve_their_model_and_scorers(path, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # anywhere but the repository root
    batch, base = load_batch(path)
    assert base == path.parent
    for folder in (batch.model, batch.evaluation.clip, batch.evaluation.dino):
        assert Path(folder).is_absolute() and Path(folder).is_dir(), folder


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_configs_validate(path):
    sweep, batch, _ = load_sweep(path)
    assert batch.methods == [sweep.method] and sweep.space
