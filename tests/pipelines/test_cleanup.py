"""A batch driver killed outright (SIGKILL: no atexit, no ray.shutdown()) while its runs train leaves no process of
its local Ray behind: the watcher started beside it ends them (without it, two linger for tens of seconds)."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines.reaper import session_processes

pytestmark = [pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def test_a_killed_batch_driver_leaves_no_ray_process(tiny_model, concept_dir, tmp_path):
    config = tmp_path / "batch.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_model), "methods": ["textual_inversion"], "storage": str(tmp_path / "store"),
        "concepts": [{"id": "blob", "images": str(concept_dir), "super_category": "toy"}], "resolution": 64,
        "latent_variants": 2, "evaluation": None, "tracking": {"enabled": False}, "samples": {"steps": 1, "seeds": [0]},
        "method_overrides": {"textual_inversion": {"stages.embedding.steps": 100000}}}))
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "cluster.cli", "batch", str(config)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    session = None
    for line in driver.stdout:
        started = re.search(r"started a local Ray .*Ray's worker logs in (\S+)/logs", line)
        if started:  # the batch's own line names its Ray session
            session = started.group(1)
        if " training, " in line and "0 training" not in line:  # the progress line: a run is training
            break
    assert session and session_processes(session), "the batch did not start training"
    driver.kill()
    driver.wait()
    deadline = time.monotonic() + 10
    while session_processes(session) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [" ".join(p.cmdline()[:3]) for p in session_processes(session) if "pipelines.reaper" not in p.cmdline()] == []
