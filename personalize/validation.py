"""Validation while training: every `every` steps, and after the last, a cheap evaluation of the weights in memory
(the first prompts of the evaluation set, sampled and scored with the run's scorers).

Each point is a row of validation.csv (step, stage, CLIP-T, CLIP-I, DINO, the objective, its seconds) and a sample
grid validation/step-<n>.png, and its `val/*` metrics go to the run's sinks (MLflow, Ray Train). With
`selection: best` the learned state of each point is kept under checkpoints/validation/ while it is among the best
`keep` (as Ray Train's CheckpointConfig keeps the best N); at the end the run's exports come from the best point and
DONE.json says which and why.
"""

from __future__ import annotations

import csv
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from personalize import checkpoint as ckpt
from personalize.run_settings import VALIDATION_SCORES, ValidationSpec

CSV = "validation.csv"
GRIDS = "validation"
COLUMNS = ["step", "stage", *VALIDATION_SCORES, "objective", "seconds"]


@dataclass
class Point:
    step: int
    stage: str
    clip_t: float
    clip_i: float
    dino: float
    objective: float
    seconds: float

    @classmethod
    def from_row(cls, row: dict) -> Point:
        return cls(int(row["step"]), row["stage"], *(float(row[k]) for k in COLUMNS[2:]))

    def metrics(self) -> dict[str, float]:
        return {f"val/{k}": getattr(self, k) for k in (*VALIDATION_SCORES, "objective")}


def objective(scores: dict[str, float], weights: dict[str, float]) -> float:
    """What `selection: best` maximises: the weighted sum of raw validation scores."""
    return float(sum(w * scores[k] for k, w in weights.items()))


def best_point(points: list[Point]) -> Point | None:
    """The highest objective; of equal ones the latest (the longer-trained weights)."""
    return max(points, key=lambda p: (p.objective, p.step), default=None)


def read_points(run_dir: str | Path) -> list[Point]:
    path = Path(run_dir) / CSV
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [Point.from_row(r) for r in csv.DictReader(f)]


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / ckpt.CHECKPOINTS / "validation"  # a folder of folders: never taken for a resume point


def point_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_root(run_dir) / f"step-{step:06d}"


@dataclass
class Schedule:
    """When a run's validation points fall: every `every` steps (counted across stages) and after the last step."""

    settings: ValidationSpec
    total_steps: int

    def due(self, step: int) -> bool:
        return step % self.settings.every == 0 or step == self.total_steps

    def points(self) -> int:
        return self.total_steps // self.settings.every + (1 if self.total_steps % self.settings.every else 0)


class Validator(Schedule):
    """The validation points of one run (on rank 0; other ranks hold only the Schedule); a resumed run keeps the
    points up to where it resumed."""

    def __init__(self, ctx, settings: ValidationSpec, scorers, resumed_at: int | None, total_steps: int):
        super().__init__(settings, total_steps)
        self.ctx, self.scorers = ctx, scorers
        self.run_dir = ctx.run_dir
        self.points = [p for p in read_points(self.run_dir) if resumed_at is not None and p.step <= resumed_at]
        self._rewrite()
        steps = {p.step for p in self.points}
        self.saved: set[int] = set()  # steps whose weights are on disk
        root = checkpoints_root(self.run_dir)
        for folder in root.iterdir() if root.is_dir() else []:
            step = int(folder.name.removeprefix("step-")) if folder.name.startswith("step-") else -1
            if step in steps and (folder / "cursor.json").is_file():
                self.saved.add(step)
            else:
                shutil.rmtree(folder)
        (self.run_dir / GRIDS).mkdir(parents=True, exist_ok=True)

    def _rewrite(self) -> None:
        with (self.run_dir / CSV).open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(asdict(p) for p in self.points)

    def validate(self, step: int, stage: str, learned: dict) -> tuple[Point, Path]:
        """Sample, score and record one point; keep its weights if it may still be chosen."""
        from personalize.sampling import image_grid  # diffusers: loaded where validation runs, not where it is planned
        from personalize.scoring import sample_and_score

        began = time.perf_counter()
        scores, images, rows = sample_and_score(self.ctx, self.settings, self.scorers, self.settings.prompt_count)
        point = Point(step, stage, *(scores[k] for k in VALIDATION_SCORES), objective(scores, self.settings.objective),
                      0.0)
        grid = self.run_dir / GRIDS / f"step-{step:06d}.png"
        labels = [r.prompt for r in rows[:: self.settings.samples]]
        image_grid(images, self.settings.samples, labels).save(grid)
        if self.settings.selection == "best":
            self._keep(point, learned)
        point.seconds = round(time.perf_counter() - began, 3)
        self.points.append(point)
        with (self.run_dir / CSV).open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writerow(asdict(point))
        return point, grid

    def _keep(self, point: Point, learned: dict) -> None:
        """Keep the best `keep` of the points whose weights are on disk and this one."""
        candidates = [p for p in self.points if p.step in self.saved] + [point]
        keep = {p.step for p in sorted(candidates, key=lambda p: (p.objective, p.step), reverse=True)[: self.settings.keep]}
        if point.step in keep:
            ckpt.save(point_dir(self.run_dir, point.step), ckpt.Cursor(-1, point.step, self.ctx.spec.config_hash(),
                                                                        self.ctx.spec.seed), learned)
            self.saved.add(point.step)
        for step in self.saved - keep:
            shutil.rmtree(point_dir(self.run_dir, step), ignore_errors=True)
        self.saved &= keep

    def select(self) -> dict:
        """Put the chosen point's weights into the models (for `selection: best`) and say which and why."""
        if not self.points:
            return {"rule": self.settings.selection, "reason": "no validation point was recorded"}
        last = self.points[-1]
        if self.settings.selection == "last":
            return {"rule": "last", "step": last.step, "objective": last.objective, "reason": "selection: last"}
        # a point can be chosen if its weights are at hand: on disk, or in memory for the last one
        best = best_point([p for p in self.points if p.step in self.saved or p is last])
        if best.step != last.step:
            ckpt.apply_learned(self.ctx.models, ckpt.load(point_dir(self.run_dir, best.step)).learned)
            reason = (f"step {best.step} scored {best.objective:.4f} on the validation objective, the last step "
                      f"({last.step}) {last.objective:.4f}")
        else:
            reason = f"the last step scored highest on the validation objective ({last.objective:.4f})"
        shutil.rmtree(checkpoints_root(self.run_dir), ignore_errors=True)
        return {"rule": "best", "step": best.step, "objective": best.objective, "last_step": last.step,
                "last_objective": last.objective, "objective_weights": dict(self.settings.objective), "reason": reason}

    def seconds(self) -> float:
        return round(sum(p.seconds for p in self.points), 2)
