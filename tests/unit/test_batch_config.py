"""Batch config errors a user meets first: an unknown method is named as such, a stage of zero steps is refused."""

import pytest
import yaml

from personalize.config import load_method
from personalize.errors import ConfigError
from pipelines.config import load_batch


def test_an_unknown_method_is_named_first_with_the_available_ones(tmp_path):
    path = tmp_path / "batch.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "methods": ["dreambooth"], "concepts": "c.yaml"}))
    with pytest.raises(ConfigError) as e:
        load_batch(path, ["methods=[nosuch]", "method_overrides.dreambooth.seed=1"])
    problems = e.value.problems
    assert problems[0].startswith("methods: unknown method 'nosuch'; available: ") and "dreambooth" in problems[0]
    assert "method_overrides names methods not in `methods`: ['dreambooth']" in problems[1]


def test_a_stage_of_zero_steps_is_refused():
    with pytest.raises(ConfigError) as e:
        load_method("textual_inversion", {"stages.embedding.steps": 0})
    assert any("embedding" in p and "steps" in p and "greater than or equal to 1" in p for p in e.value.problems)
