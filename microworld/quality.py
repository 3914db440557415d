"""The quality benchmark of the micro world, run as `personalize batch`es: every method on held-out concepts and
seeds (local Ray, or a cluster under `ray job submit`), scored by the world CLIP (CLIP-T, CLIP-I) and the
self-supervised identity encoder (in DINO's role), identity normalised between each concept's floor (the base
model asked for the class) and ceiling (held-out photos), with per-method 95 % bootstrap intervals and the
papers' claims tested against them (microworld/claims.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from microworld.claims import PAIR_BASELINE, PAIR_LABEL
from microworld.concepts import CONCEPTS, write_concepts, write_pair
from microworld.probes import attention_shares, subject_separation
from personalize.config import load_method
from personalize.scaling import load_recipe_scale

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models" / "microworld"
PAIR_METHODS = ("disendiff",)  # several subjects from one image: trained on the two-subject photo
# DisenDiff's baseline (claims.PAIR_BASELINE) trains on the two-subject photo with one modifier per subject and
# DisenDiff's captions, as in DisenDiff's comparison.
PAIR_BASELINE_OVERRIDES = {"placeholder.string": "<{concept}-{index}>", "placeholder.init": ["id:47629", "id:42170"],
                           "prompt": "photo of a {subjects}", "class_prior.prompt": "photo of {classes}"}

# Stage lengths relative to each (model-scaled) recipe, so the default setting fits an hour on two CPU cores.
REDUCED_SCALES = {"textual_inversion": 0.1, "dreambooth": 0.75, "dreambooth_lora": 0.75, "rare_two_stage": 0.6,
                  "rare_two_stage_lora": 0.6, "attndreambooth": 0.5, "attndreambooth_lora": 0.5, "core": 0.3, "core_lora": 0.3,
                  "custom_diffusion": 1.0, "disendiff": 1.0}
# The papers' seven methods; their LoRA variants are measured on request (--methods dreambooth_lora ...).
PAPER_METHODS = ["attndreambooth", "core", "custom_diffusion", "disendiff", "dreambooth", "rare_two_stage", "textual_inversion"]
REDUCED_PRIORS = 16  # class-prior images per set in the default setting (papers: 200)
SCORES = ("clip_t", "clip_i", "dino", "clip_i_floor", "clip_i_ceiling", "clip_i_norm", "dino_floor", "dino_ceiling", "dino_norm")


@dataclass
class Setting:
    concepts: int = 2
    seeds: int = 2
    methods: list[str] = field(default_factory=lambda: list(PAPER_METHODS))
    scales: dict[str, float] = field(default_factory=lambda: dict(REDUCED_SCALES))
    class_images: int | None = REDUCED_PRIORS
    samples: int = 2  # images per evaluation prompt
    eval_steps: int = 20
    latent_variants: int = 8
    concurrent_runs: int = 2
    track: bool = True  # MLflow tracking of the batches (experiment "world-quality")
    prior_steps: int = 20  # sampling steps of each class-prior image
    tto_steps: int | None = None  # CoRe's test-time optimisation steps per prompt; None: the recipe's

    @classmethod
    def full(cls) -> Setting:
        return cls(concepts=len(CONCEPTS), seeds=3, scales={m: 1.0 for m in REDUCED_SCALES}, class_images=None, samples=4,
                   eval_steps=50)

    @classmethod
    def smoke(cls, methods: list[str]) -> Setting:
        return cls(concepts=1, seeds=1, methods=methods, scales={m: 0.01 for m in REDUCED_SCALES}, class_images=2,
                   samples=1, eval_steps=2, latent_variants=1, track=False, prior_steps=2, tto_steps=1)


def method_overrides(method: str, setting: Setting, models: Path, pair: bool = False) -> dict:
    """Each stage's length times the setting's scale for the method, after the model's own recipe scale; on the
    two-subject photo, the pair baseline names both subjects."""
    scaled = load_method(method, scale=load_recipe_scale(str(models / "model")))
    scale = setting.scales.get(method, 1.0)
    overrides = {f"stages.{s.name}.steps": max(1, round(s.steps * scale)) for s in scaled.stages} if scale != 1.0 else {}
    if pair and method == PAIR_BASELINE:
        overrides.update(PAIR_BASELINE_OVERRIDES)
    if setting.class_images and scaled.class_prior is not None:
        overrides.update({"class_prior.num_images": setting.class_images, "class_prior.inference_steps": setting.prior_steps,
                          "class_prior.guidance_scale": 5.0})
    if setting.tto_steps is not None and scaled.test_time is not None:
        overrides["test_time.steps"] = setting.tto_steps
    return overrides


def evaluation_settings(setting: Setting, models: Path, **extra) -> dict:
    return {"prompts": "world_eval", "samples": setting.samples, "scheduler": "ddim", "steps": setting.eval_steps,
            "guidance_scale": 5.0, "eta": 0.0, "clip": str(models / "clip"), "dino": str(models / "identity"), **extra}


def test_time_rows(frame: pd.DataFrame, setting: Setting, models: Path) -> pd.DataFrame:
    """CoRe's runs evaluated again with its test-time optimisation (method `core+tto`), in this process; a finished
    evaluation is reused."""
    from personalize.evaluation import evaluate_run
    from personalize.run_settings import EvaluationSpec

    settings = EvaluationSpec(**evaluation_settings(setting, models, tto=True))
    rows = []
    for row in frame[(frame["method"] == "core") & frame["status"].isin(["finished", "skipped"])].to_dict("records"):
        metrics = evaluate_run(row["run_dir"], settings, progress=False).metrics
        rows.append({**row, "method": "core+tto", **{k: metrics.get(k, float("nan")) for k in SCORES},
                     "placeholder_attention": float("nan")})  # not measured with the prompt-tuned rows
    return pd.DataFrame(rows, columns=frame.columns)



def batch_config(setting: Setting, methods: list[str], concepts, seed: int, storage: Path, models: Path, pair: bool = False):
    """One `personalize batch` of the benchmark: one protocol for every method (DDIM, guidance 5), so the scores
    compare methods, not samplers."""
    from pipelines.config import BatchConfig

    return BatchConfig(
        name="world-quality", model=str(models / "model"), methods=methods, concepts=concepts, storage=str(storage),
        seed=seed, resolution=64, latent_variants=setting.latent_variants,
        method_overrides={m: method_overrides(m, setting, models, pair) for m in methods},
        samples={"prompts": ["a photo of a {subject} on the beach"], "seeds": [0], "steps": 10, "heatmaps": False,
                 "every_stage": False},
        evaluation=evaluation_settings(setting, models),
        resources={"max_concurrent_runs": setting.concurrent_runs},
        tracking={"enabled": setting.track, "experiment": "world-quality", "register_models": False},
    )


def base_method(label: str) -> str:
    """The method behind a row's label ("core+tto", "custom_diffusion (two subjects)")."""
    return label.removesuffix("+tto").removesuffix(PAIR_LABEL)


def pair_methods(methods: list[str]) -> list[str]:
    """What trains on the two-subject photo: the pair methods asked for, with their baseline when both are."""
    pairs = [m for m in methods if m in PAIR_METHODS]
    return pairs + [PAIR_BASELINE] if pairs and PAIR_BASELINE in methods else pairs


def trained_steps(method: str, setting: Setting, models: Path, scale) -> int:
    overrides = method_overrides(method, setting, models)
    return sum(overrides.get(f"stages.{s.name}.steps", s.steps) for s in load_method(method, scale=scale).stages)


def run(out: Path, setting: Setting, models: Path = MODELS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every (method, concept, seed) trained and evaluated through `personalize batch`, one row per run, with the
    placeholder's attention share; and the subject separation of the runs on the two-subject photo, one row per
    (run, subject)."""
    from pipelines.batch import run_batch
    from pipelines.tracking import tracker_for

    out = out.resolve()
    manifest = write_concepts(out / "concepts", CONCEPTS[: setting.concepts])
    pair = write_pair(out / "concepts", CONCEPTS[0], CONCEPTS[1])
    singles = [m for m in setting.methods if m not in PAIR_METHODS]
    pairs = pair_methods(setting.methods)
    frames = []
    for seed in range(setting.seeds):
        for methods, concepts, group in ((singles, str(manifest), "single"), (pairs, [pair], "pair")):
            if not methods:
                continue
            storage = out / f"seed-{seed}" / group
            config = batch_config(setting, methods, concepts, seed, storage, models, pair=group == "pair")
            with tracker_for(config) as tracker:
                run_batch(config, out / "concepts", tracker)
            part = pd.read_parquet(storage / "results" / "results.parquet").assign(seed=seed, group=group)
            if group == "pair":
                part["method"] = part["method"].map(lambda m: m if m in PAIR_METHODS else m + PAIR_LABEL)
            frames.append(part)
    frame = pd.concat(frames, ignore_index=True)
    frame["placeholder_attention"] = attention_shares(frame[frame["group"] == "single"], setting.eval_steps)
    separation = pair_separation(frame[frame["group"] == "pair"], out, setting, models)
    frame = pd.concat([frame, test_time_rows(frame, setting, models)], ignore_index=True)
    done = frame["status"].isin(["finished", "skipped"])
    frame["clip_t_base"] = frame["run_dir"].where(done).map(lambda d: base_clip_t(d, setting, models))
    frame["clip_t_ratio"] = frame["clip_t"] / frame["clip_t_base"]
    scale = load_recipe_scale(str(models / "model"))
    frame["steps"] = frame["method"].map(lambda m: trained_steps(base_method(m), setting, models, scale))
    # a run found finished (a resubmission) reports no training time of its own: its stages' recorded times
    frame["train_seconds"] = frame["stage_seconds"].map(lambda t: round(sum(json.loads(t or "{}").values()), 2))
    frame.to_csv(out / "quality_runs.csv", index=False)
    separation.to_csv(out / "quality_separation.csv", index=False)
    return frame, separation


def base_clip_t(run_dir, setting: Setting, models: Path) -> float:
    """CLIP-T of the base model on the run's evaluation prompts and seeds, asked for the class instead of the
    subject: the identity floor's samples (shared by every method on the concept), scored for text alignment too."""
    from personalize.evaluation import FLOOR_FILE, floor_folder, read_spec
    from personalize.run_settings import EvaluationSpec

    if not isinstance(run_dir, str) or not run_dir:
        return float("nan")
    path = floor_folder(Path(run_dir), read_spec(run_dir), EvaluationSpec(**evaluation_settings(setting, models))) / FLOOR_FILE
    return float(json.loads(path.read_text())["clip_t"]) if path.is_file() else float("nan")


def pair_separation(frame: pd.DataFrame, out: Path, setting: Setting, models: Path) -> pd.DataFrame:
    settings = evaluation_settings(setting, models)
    return subject_separation(frame, (CONCEPTS[0], CONCEPTS[1]), out / "pair-subjects", setting.samples,
                              setting.eval_steps, settings["clip"], settings["dino"])


GENERATED_BEGIN = "<!-- results: written by bench/quality.py -->"
GENERATED_END = "<!-- end of results -->"


def with_generated_section(path: Path, generated: str) -> str:
    """The file's text with its generated results replaced; the hand-written rest (the analysis) is kept."""
    block = f"{GENERATED_BEGIN}\n{generated}{GENERATED_END}\n"
    text = path.read_text() if path.is_file() else ""
    if GENERATED_BEGIN in text and GENERATED_END in text:
        before, rest = text.split(GENERATED_BEGIN, 1)
        after = rest.split(GENERATED_END, 1)[1].lstrip("\n")
        return before + block + ("\n" + after if after else "")
    return block + ("\n" + text if text else "")


def relative_paths(frame: pd.DataFrame, work: Path) -> pd.DataFrame:
    """The runs table with its run and report paths relative to the benchmark's work folder, as the docs publish
    it (the folder is the reader's own)."""
    root = str(work.resolve()) + "/"
    published = frame.copy()
    for column in ("run_dir", "report"):
        if column in published:
            published[column] = published[column].map(lambda p: p.removeprefix(root) if isinstance(p, str) else p)
    return published


def write_report(frame: pd.DataFrame, setting: Setting, folder: Path, minutes: float,
                 separation: pd.DataFrame | None = None, work: Path | None = None) -> dict[str, Path]:
    """docs: the summary, runs and separation tables, quality.md's generated section and the plot; with `work`,
    the published run paths are relative to it and the sample sheets are drawn from its runs."""
    from microworld.claims import claims_markdown, method_summary, separation_markdown, summary_markdown, tradeoff_plot
    from microworld.sample_sheets import eval_sheet, pair_sheet

    folder.mkdir(parents=True, exist_ok=True)
    finished = frame[frame["status"].isin(["finished", "skipped"])]
    table = method_summary(finished)
    paths = {"markdown": folder / "quality.md", "csv": folder / "quality.csv", "scatter": folder / "quality.png",
             "runs": folder / "quality_runs.csv"}
    table.to_csv(paths["csv"], index=False)
    (frame if work is None else relative_paths(frame, work)).to_csv(paths["runs"], index=False)
    if separation is not None:
        paths["separation"] = folder / "quality_separation.csv"
        separation.to_csv(paths["separation"], index=False)
    pair = separation_markdown(separation)
    generated = (summary_markdown(table, finished, setting, minutes) + ("\n" + pair if pair else "") + "\n"
                 + claims_markdown(finished, separation))
    paths["markdown"].write_text(with_generated_section(paths["markdown"], generated))
    tradeoff_plot(table, finished, paths["scatter"])
    if work is not None:
        sheets = {"eval_samples": eval_sheet(frame, work, folder / "quality-eval-samples.jpg"),
                  "pair_samples": pair_sheet(work, folder / "quality-pair-samples.jpg")}
        paths.update({name: path for name, path in sheets.items() if path is not None})
    (folder / "quality_setting.json").write_text(json.dumps(setting.__dict__, indent=1))
    return paths
