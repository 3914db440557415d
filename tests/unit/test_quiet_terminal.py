"""Without -v the terminal shows our progress and results, not the libraries' notices: MLflow's registration lines,
its database set-up notes, Ray Data's "progress bars disabled" and Ray's token-authentication notice."""

import logging
import os

import pytest
from mlflow.utils.logging_utils import eprint

from pipelines.batch import quiet_ray_data
from pipelines.registry import registration_notices_off


def test_mlflow_registration_lines_show_only_with_verbose(capsys, monkeypatch):
    monkeypatch.delenv("PERSONALIZE_VERBOSE", raising=False)
    with registration_notices_off():
        eprint("Successfully registered model 'demo.ball'.")
    eprint("after")  # MLflow's stream is given back as it was
    assert capsys.readouterr().err == "after\n"

    monkeypatch.setenv("PERSONALIZE_VERBOSE", "1")
    with registration_notices_off():
        eprint("Created version '2' of model 'demo.ball'.")
    assert "Created version '2'" in capsys.readouterr().err


def test_ray_data_says_nothing_about_its_progress_bars_unless_verbose(monkeypatch):
    monkeypatch.delenv("PERSONALIZE_VERBOSE", raising=False)
    quiet_ray_data()
    assert not logging.getLogger("ray.data").isEnabledFor(logging.WARNING)
    monkeypatch.setenv("PERSONALIZE_VERBOSE", "1")
    quiet_ray_data()
    assert logging.getLogger("ray.data").isEnabledFor(logging.WARNING)


def test_the_command_sets_mlflow_to_warnings_before_it_is_configured(monkeypatch):
    from pipelines.command import run_command

    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    monkeypatch.delenv("PERSONALIZE_VERBOSE", raising=False)
    seen = {}

    def work() -> int:
        seen["level"] = os.environ.get("MLFLOW_LOGGING_LEVEL")
        return 0

    assert run_command(work) == 0
    assert seen["level"] == "WARNING"


NOTICE = ("[2026-12-01 02:14:44,308 E 24722 24722] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches(A))'"
          " and ID: 'b4d4' has constructor arguments in the object store and max_restarts > 0. If the arguments in the "
          "object store go out of scope or are lost, the actor restart will fail. See "
          "https://github.com/ray-project/ray/issues/53727 for more details.\n")


def test_only_rays_actor_arguments_notice_is_dropped():
    from pipelines.stderr_filter import drop_known_lines

    other = "[2026-12-01 02:14:44,308 E 1 1] core_worker.cc:99: Something else failed.\n"
    text = f"loading\r50%\r100%\n{NOTICE}{other}{NOTICE}done\n".encode()
    assert drop_known_lines(text) == f"loading\r50%\r100%\n{other}done\n".encode()


FILTERED = '''
import os, subprocess, sys
import pandas as pd
import ray
from pipelines.stderr_filter import filtered_stderr

NOTICE = {notice!r}


class Same:
    def __call__(self, batch):
        return batch


def everything(tag):
    print(tag, "python line", file=sys.stderr, flush=True)
    os.write(2, NOTICE.encode() + tag.encode() + b" C++ line\\n")
    child = "import os; os.write(2, os.environ['NOTICE'].encode() + b'child line' + bytes([10]))"
    subprocess.run([sys.executable, "-c", child], env={{**os.environ, "NOTICE": NOTICE}})
    rows = ray.data.from_pandas(pd.DataFrame({{"x": [1, 2]}})).map_batches(
        Same, batch_size=1, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=1)).take_all()
    print(tag, "rows", len(rows), file=sys.stderr, flush=True)


ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
everything("plain")
print("=== filtered from here", file=sys.stderr, flush=True)
with filtered_stderr():
    everything("filtered")
print("after", file=sys.stderr, flush=True)
ray.shutdown()
'''


@pytest.mark.slow
def test_a_commands_terminal_keeps_everything_but_the_notice_even_from_ray(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "filtered.py"
    script.write_text(FILTERED.format(notice=NOTICE))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    plain, filtered = done.stderr.split("=== filtered from here")
    # without the filter: ours, the child's and the Ray Data actor's notice; with it, none, and nothing else lost
    assert plain.count("has constructor arguments in the object store") == 3, plain
    assert "has constructor arguments in the object store" not in filtered, filtered
    ours = ["filtered python line", "filtered C++ line", "child line", "filtered rows 2", "after"]
    assert [line for line in filtered.splitlines() if line in ours] == ours
