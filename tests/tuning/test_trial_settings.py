"""What a sweep hands its trials is one typed object; a trial's sampled values land where they belong."""

import pytest

from personalize.errors import ConfigError
from personalize.run_settings import EvaluationSpec
from pipelines.config import BatchConfig
from tuning.config import TrialSettings


def settings() -> TrialSettings:
    batch = BatchConfig(model="/models/tiny", methods=["rare_two_stage"], concepts=[{"id": "ball", "images": "/x", "super_category": "ball"}],
                        method_overrides={"rare_two_stage": {"stages.token.steps": 3}}, storage="/tmp/store")
    return TrialSettings(name="s", batch=batch, base_dir="/cfg", stage_eval=EvaluationSpec(samples=1), final_eval=EvaluationSpec(),
                         stage_eval_prompts=2, weights={"clip_t": 1.0, "dino": 1.0}, trial_timeout_s=60,
                         scaling={"num_workers": 1, "use_gpu": False})


def test_the_settings_survive_the_trip_through_tune_unchanged():
    sent = settings()
    assert TrialSettings.model_validate_json(sent.model_dump_json()) == sent


def test_method_keys_go_to_the_tuned_method_and_the_rest_to_the_batch():
    batch = settings().trial_batch({"stages.model.lr": 1e-3, "seed": 7, "resources.cpus_per_run": 2.0})
    assert batch.method_overrides == {"rare_two_stage": {"stages.token.steps": 3, "stages.model.lr": 1e-3}}
    assert batch.seed == 7 and batch.resources.cpus_per_run == 2.0
    assert batch.concepts[0].id == "ball" and batch.storage == "/tmp/store"


def test_a_sampled_value_out_of_range_names_its_key():
    with pytest.raises(ConfigError, match="resolution"):
        settings().trial_batch({"resolution": 4})


def test_the_watchdog_fails_a_trial_past_its_limit_or_silent_after_a_report():
    from tuning.trial import Watchdog

    dog = Watchdog(on_expiry=None, limit_s=100, report_limit_s=10)
    dog.started = 0.0
    assert dog.expired(50.0) is None  # silent since its start: only the whole limit applies before a first report
    dog.last_report = 45.0
    assert dog.expired(54.0) is None
    assert "reported nothing for 10 s" in dog.expired(56.0)
    dog.last_report = 95.0
    assert "longer than 100 s" in dog.expired(101.0)


def test_the_watchdog_thread_calls_back_once_with_the_reason():
    import threading

    from tuning.trial import Watchdog

    reasons, fired = [], threading.Event()
    dog = Watchdog(lambda reason: (reasons.append(reason), fired.set()), limit_s=0.2, check_s=0.05).start()
    assert fired.wait(5)
    dog.cancel()
    assert len(reasons) == 1 and "longer than 0 s" in reasons[0]
