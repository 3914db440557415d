"""A run tracked in MLflow before the config hash left folder locations out is found again by its old key, so a
resubmitted batch neither duplicates it nor marks it failed."""

from mlflow.tracking import MlflowClient

from pipelines.tracking import RUN_KEY, RunTracker, child_run, run_keys


def test_a_child_run_under_the_located_hash_is_found_and_reused(spec_for, tmp_path):
    spec = spec_for("textual_inversion")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("keys", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(experiment).info.run_id
    legacy_key = f"blob/textual_inversion/{spec.config_hashes()[1]}"
    assert run_keys(spec) == [f"blob/textual_inversion/{spec.config_hash()}", legacy_key]
    old = client.create_run(experiment, tags={"mlflow.parentRunId": parent, RUN_KEY: legacy_key}).info.run_id

    assert child_run(client, experiment, parent, run_keys(spec)).info.run_id == old
    assert child_run(client, experiment, parent, run_keys(spec)[0]) is None
    tracker = RunTracker({"uri": uri, "experiment_id": experiment, "parent_run_id": parent}, spec)
    assert tracker.run_id == old
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert [r.info.run_id for r in children] == [old]
