"""Without -v the terminal shows our progress and results, not the libraries' notices: MLflow's registration lines,
its database set-up notes, Ray Data's "progress bars disabled" and Ray's token-authentication notice."""

import logging
import os

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
