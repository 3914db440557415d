"""MLflow for sweeps: a sweep parent run (one child per trial, created by the trial's Train worker), the
trials table, the Pareto plot and the best configuration as artifacts."""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

from pipelines.redaction import redact
from pipelines.tracking import BatchTracker, child_run


class SweepTracker(BatchTracker):
    def sweep_finished(self, frame, paths: dict, logs: Path | None = None) -> None:
        from mlflow.entities import Metric

        for row in frame.itertuples():
            run = child_run(self.client, self.experiment, self.parent, f"trial/{row.trial_id}")
            if run is None:
                continue
            if row.objective == row.objective and row.objective is not None:  # not NaN
                self.client.log_batch(run.info.run_id, metrics=[Metric("objective", float(row.objective), 0, int(row.reports))])
            status = {"finished": "FINISHED", "stopped": "KILLED"}.get(row.status, "FAILED")
            self.client.set_tag(run.info.run_id, "trial_status", row.status)
            if row.status == "stopped":
                self.client.set_tag(run.info.run_id, "stopped_by", "scheduler at a stage boundary")
            if row.error:
                self.client.set_tag(run.info.run_id, "failure_reason", redact(row.error))
            if run.info.status != status:
                self.client.set_terminated(run.info.run_id, status=status)
        for path in paths.values():
            self.client.log_artifact(self.parent, str(path), "sweep")
        if logs is not None:
            self.client.log_artifacts(self.parent, str(logs), "logs")
        self.client.set_terminated(self.parent, status="FINISHED")


@contextmanager
def sweep_tracker(sweep, batch):
    if not batch.tracking.enabled:
        yield None
        return
    params = {"sweep": sweep.model_dump(mode="json"), "batch": batch.model_dump(mode="json", exclude={"tracking"})}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    tracker = SweepTracker(batch.tracking, sweep.name, params, key, kind="sweep")
    try:
        yield tracker
    except BaseException as e:
        tracker.fail(f"{type(e).__name__}: {e}")
        raise
