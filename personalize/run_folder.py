"""A run folder's layout and states: the one place that knows its marker files and what they mean.

    <output_dir>/<concept>/<method>/
        config.resolved.json   the RunSpec it was trained with
        DONE.json              finished: config hash, stage timings, outputs (written last, atomically)
        FAILED.json            failed for good (bad input): the reason and the config hash
        checkpoints/           stage checkpoints of a run part-way (personalize/checkpoint.py)
        validation.csv         validation points, with their grids in validation/ (personalize/validation.py)
        node.json              on Ray: the node that trained each stage and finished the run (pipelines/worker.py)

A folder belongs to the configuration whose hash its DONE.json or latest checkpoint records; a run of another
configuration never writes into it, so finished or partial work is never overwritten.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

from personalize import checkpoint
from personalize.errors import RunStateError
from personalize.loss_log import read_timings
from personalize.run_settings import RunSpec

DONE = "DONE.json"
FAILED = "FAILED.json"
RESOLVED_CONFIG = "config.resolved.json"


def read_done(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / DONE
    return json.loads(path.read_text()) if path.is_file() else None


def is_finished(run_dir: str | Path) -> bool:
    return (Path(run_dir) / DONE).is_file()


def write_done(run_dir: str | Path, config_hash: str, outputs: list[str], **details) -> None:
    """The finished marker, written last and atomically: a folder with DONE.json holds every output. `details`:
    e.g. which validation point the outputs come from and why."""
    tmp = Path(run_dir) / (DONE + ".tmp")
    tmp.write_text(json.dumps({"config_hash": config_hash, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "stages": read_timings(run_dir), "outputs": outputs, **details}, indent=1))
    tmp.rename(Path(run_dir) / DONE)


def check_photos(run_dir: str | Path, done: dict, spec: RunSpec) -> None:
    """A finished run is reused only while its concept's photos, captions and masks are those it trained on (runs
    finished before the photos were recorded are reused as they are)."""
    from personalize.errors import ConceptError
    from personalize.fingerprint import photos_fingerprint

    recorded = done.get("photos")
    if recorded is None:
        return
    try:
        unchanged = recorded in (photos_fingerprint(spec), photos_fingerprint(spec, folder_names=True))
    except ConceptError:  # unreadable photos are the concept checks' to report
        return
    if not unchanged:
        raise RunStateError(
            f"{spec.concept.id}: its photos, captions or masks changed since the run in {run_dir} finished; that run is "
            f"kept. Train the new photos under another concept id or storage, or delete {run_dir} to train it again")


def check_resumed_photos(run_dir: str | Path, recorded: str | None, current: str, concept: str) -> None:
    """A run part-way resumes only on the photos it started on (checkpoints written before photos were recorded
    resume as they are)."""
    if recorded is not None and recorded != current:
        raise RunStateError(
            f"{concept}: its photos, captions or masks changed since the run in {run_dir} started; its checkpoints "
            f"are kept. Train the new photos under another concept id or storage, or delete {run_dir} to start again")


def stage_seconds(done: dict) -> dict[str, float]:
    """Stage name -> seconds, from a run's DONE.json."""
    return {name: timing["seconds"] for name, timing in done.get("stages", {}).items()}


def write_failed(run_dir: str | Path, reason: str, config_hash: str) -> Path:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    path = Path(run_dir) / FAILED
    path.write_text(json.dumps({"reason": reason, "config_hash": config_hash}))
    return path


def failure_reason(run_dir: str | Path) -> str | None:
    path = Path(run_dir) / FAILED
    return json.loads(path.read_text())["reason"] if path.is_file() else None


def failure_hash(run_dir: str | Path) -> str | None:
    """The config hash of the run that failed for good in this folder; None when none did."""
    path = Path(run_dir) / FAILED
    return json.loads(path.read_text()).get("config_hash") if path.is_file() else None


def write_resolved_config(spec: RunSpec) -> None:
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    (spec.run_dir / RESOLVED_CONFIG).write_text(spec.model_dump_json(indent=1))


def finished_spec(run_dir: str | Path) -> RunSpec:
    """The RunSpec of a finished run; a folder that is not one is a RunStateError saying what to do."""
    path = Path(run_dir) / RESOLVED_CONFIG
    if not is_finished(run_dir) or not path.is_file():
        raise RunStateError(f"{run_dir} is not a finished run (no {DONE}); train it first or pass a run folder")
    return RunSpec.model_validate_json(path.read_text())


def owner(run_dir: str | Path) -> str | None:
    """The config hash of the run a folder holds, finished or part-way; None for a folder with no run in it."""
    done = read_done(run_dir)
    if done is not None:
        return done["config_hash"]
    found = checkpoint.latest_cursor(Path(run_dir))
    return found[0].config_hash if found else None


def other_configuration(location: str | Path, found: str, expected: str) -> RunStateError:
    return RunStateError(
        f"{location} holds a run of a different configuration (hash {found}, this one {expected}); "
        "finished or partial work is never overwritten: choose another output_dir or storage, or remove that folder"
    )


def check_owner(run_dir: str | Path, found: str, spec: RunSpec) -> None:
    if not spec.owns(found):
        raise other_configuration(run_dir, found, spec.config_hash())


def find_finished(paths: Iterable[str | Path]) -> list[Path]:
    """Finished run folders: given directly, or found below the given folders (evaluations left out)."""
    runs = []
    for p in map(Path, paths):
        if is_finished(p):
            runs.append(p)
        elif p.is_dir():
            runs += sorted(d.parent for d in p.rglob(DONE) if "eval" not in d.parent.parts)
    return list(dict.fromkeys(runs))
