"""In-process training of many runs: one bad concept is reported and skipped, the others go on."""

from __future__ import annotations

import logging
import traceback

from personalize.errors import ConceptError, PersonalizeError, RunStateError
from personalize.outcome import RunOutcome
from personalize.run_settings import RunSpec
from personalize.runners import runner_for

log = logging.getLogger(__name__)


def train_one(spec: RunSpec, resume: bool = True, sink=None, progress: bool = True) -> RunOutcome:
    try:
        return runner_for(spec.method.name)(spec, sink=sink, progress=progress, resume=resume)
    except (ConceptError, RunStateError) as e:
        log.error("%s", e)
        return RunOutcome(spec, "failed", str(e))
    except PersonalizeError as e:
        log.error("concept '%s', method %s: %s", spec.concept.id, spec.method.name, e)
        return RunOutcome(spec, "failed", str(e))
    except Exception as e:  # a crash in one run must not take the others down
        log.error("concept '%s', method %s crashed:\n%s", spec.concept.id, spec.method.name, traceback.format_exc())
        return RunOutcome(spec, "failed", f"{type(e).__name__}: {e}")


def train_all(runs: list[RunSpec], resume: bool = False) -> list[RunOutcome]:
    outcomes = [train_one(spec, resume=resume) for spec in runs]
    print(outcome_table(outcomes))
    return outcomes


def outcome_table(outcomes: list[RunOutcome]) -> str:
    rows = [("concept", "method", "status", "stages (s)", "final loss", "output / reason")]
    for o in outcomes:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in o.stage_seconds.items())
        loss = f"{o.last_losses['loss']:.4f}" if "loss" in o.last_losses else ""
        rows.append((o.concept, o.method, o.status, stages, loss, o.reason if o.status == "failed" else str(o.run_dir)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 20)
    return "\n".join(lines)
