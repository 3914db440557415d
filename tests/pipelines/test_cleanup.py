"""A batch driver killed outright (SIGKILL: no atexit, no ray.shutdown()) while its runs train leaves no process of
its local Ray behind: the watcher started beside it ends them (without it, two linger for tens of seconds). Ctrl-C
(SIGINT) stops it at once, with status 130 and how to resume, though its runs' Train controllers were being waited
on from threads of the driver."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines.reaper import session_processes

pytestmark = [pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_a_killed_or_interrupted_batch_driver_leaves_no_ray_process(how, tiny_model, concept_dir, tmp_path):
    config = tmp_path / "batch.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_model), "methods": ["textual_inversion"], "storage": str(tmp_path / "store"),
        "concepts": [{"id": "blob", "images": str(concept_dir), "super_category": "toy"}], "resolution": 64,
        "latent_variants": 2, "evaluation": None, "tracking": {"enabled": False}, "samples": {"steps": 1, "seeds": [0]},
        "method_overrides": {"textual_inversion": {"stages.embedding.steps": 100000}}}))
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    # a shell without job control starts background commands with Ctrl-C ignored, and children inherit that: the
    # driver gets Ctrl-C's default however these tests were started
    driver = subprocess.Popen([sys.executable, "-m", "cluster.cli", "batch", str(config)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    session = None
    for line in driver.stdout:
        started = re.search(r"started a local Ray .*Ray's worker logs in (\S+)/logs", line)
        if started:  # the batch's own line names its Ray session
            session = started.group(1)
        if how == "SIGKILL" and " training, " in line and "0 training" not in line:  # the progress line: it trains
            break
        if how == "SIGINT" and "pipelines.train: training blob" in line:  # its fit is in flight in a driver thread
            break
    assert session and session_processes(session), "the batch did not start training"
    if how == "SIGKILL":
        driver.kill()
        driver.wait()
    else:
        driver.send_signal(signal.SIGINT)
        rest = driver.communicate(timeout=60)[0]
        assert driver.returncode == 130, rest
        assert "interrupted: finished runs are kept" in rest and "run the same command again to resume" in rest
    deadline = time.monotonic() + 10
    while session_processes(session) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [" ".join(p.cmdline()[:3]) for p in session_processes(session) if "pipelines.reaper" not in p.cmdline()] == []
