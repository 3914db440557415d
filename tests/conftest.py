"""Shared fixtures: a tiny SD model built offline, concept images drawn by the tests, quick run specs."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# tiny models gain nothing from a second thread; under pytest-xdist each worker process takes one core
torch.set_num_threads(1 if "PYTEST_XDIST_WORKER" in os.environ else 2)
# the session's caches (s3 mirrors, class priors, downloaded models) live in a folder of its own, set before any
# Ray or stack process starts so that they inherit it: nothing is read from or left in the user's ~/.cache
# (Ray workers import this module too when they load a test's function: they inherit the folder, never make one)
OWNS_CACHE = "PERSONALIZE_TEST_SESSION_CACHE" not in os.environ
if OWNS_CACHE:
    os.environ["PERSONALIZE_TEST_SESSION_CACHE"] = tempfile.mkdtemp(prefix="personalize-test-cache-")
os.environ["PERSONALIZE_CACHE"] = os.environ["PERSONALIZE_TEST_SESSION_CACHE"]


SESSION_RAY_FIXTURES = {"local_ray", "seaweedfs", "ray_with_s3"}
# The modules whose tests start Ray (the session's, or a cluster or stack of their own). Under pytest-xdist one
# worker runs them in order, from the start: they set the suite's length. LATE_RAY_MODULES come last of all, as a
# second unit, which the worker that runs out of in-process tests takes while the first unit is still going: two
# Ray clusters side by side on 2 cores slow each other, but the suite ends sooner than with that worker idle
# (measured at 2 cores: the in-process tests end at about 580 s, the Ray unit alone would run about 1,200 s).
# The sweeps open the first unit, so they run beside the in-process tests and never beside the late unit's
# cluster: a resumed sweep's trial twice hung for its whole 600 s timeout beside another Ray cluster. The late
# modules use no SeaweedFS (its ports are fixed) and look at no process outside their own.
FIRST_RAY_MODULES = {"tests/tuning/test_sweep.py"}
RAY_MODULES = {
    "tests/e2e/test_stack_job_browser.py",
    "tests/pipelines/test_batch.py",
    "tests/pipelines/test_cluster.py",
    "tests/pipelines/test_multinode.py",
    "tests/pipelines/test_preflight_storage.py",
    "tests/pipelines/test_storage.py",
    "tests/tuning/test_sweep.py",
}
LATE_RAY_MODULES = {
    "tests/microworld/test_quality_smoke.py",
    "tests/pipelines/test_bad_input_corpus.py",
    "tests/pipelines/test_cleanup.py",
    "tests/pipelines/test_scale.py",
    "tests/unit/test_quiet_terminal.py",
}


def module_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def ray_unit(nodeid: str) -> str | None:
    module = module_of(nodeid)
    return "ray" if module in RAY_MODULES else "ray-late" if module in LATE_RAY_MODULES else None


def pytest_collection_modifyitems(config, items):
    starts_ray = [item for item in items if SESSION_RAY_FIXTURES & set(item.fixturenames) or item.get_closest_marker("slow")]
    unlisted = sorted({module_of(item.nodeid) for item in starts_ray} - RAY_MODULES - LATE_RAY_MODULES)
    if unlisted:
        raise pytest.UsageError(f"tests starting Ray in {unlisted}: add their modules to RAY_MODULES (or LATE_RAY_MODULES) in tests/conftest.py")
    items.sort(key=lambda item: ({"ray": 0, None: 1, "ray-late": 2}[ray_unit(item.nodeid)],
                                 module_of(item.nodeid) not in FIRST_RAY_MODULES))


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's load balancing in collection order, with each group of Ray modules as one unit of work."""
    from xdist.scheduler import LoadScopeScheduling

    class RayModulesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return ray_unit(nodeid) or nodeid

    config.option.loadscopereorder = False  # the order above, not the largest unit first
    return RayModulesTogether(config, log)


def pytest_sessionfinish(session, exitstatus):
    if OWNS_CACHE:
        shutil.rmtree(os.environ["PERSONALIZE_TEST_SESSION_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from personalize.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_models(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """The tiny model of each architecture the methods must run on (sd15 is `tiny_model`)."""
    from personalize.models import TINY_ARCHS, build_tiny_model

    return {"sd15": tiny_model, **{arch: build_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}") / "model", seed=0,
                                                          arch=TINY_ARCHS[arch]) for arch in ("sd21", "sdxl")}}


def draw_concept(folder: Path, n: int = 4, size: int = 80, colour=(200, 40, 180), seed: int = 0) -> Path:
    """A patterned blob on shifting backgrounds, n photos."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        bg = tuple(rng.randrange(40, 220) for _ in range(3))
        im = Image.new("RGB", (size + 8 * i, size), bg)
        d = ImageDraw.Draw(im)
        x, y = rng.randrange(5, 20), rng.randrange(5, 20)
        d.ellipse((x, y, x + 50, y + 50), fill=colour)
        d.line((x, y, x + 50, y + 50), fill=(255, 255, 0), width=4)
        im.save(folder / f"{i}.png")
    return folder


@pytest.fixture
def concept_dir(tmp_path) -> Path:
    return draw_concept(tmp_path / "images")


@pytest.fixture
def pair_dir(tmp_path) -> Path:
    folder = tmp_path / "pair"
    folder.mkdir()
    im = Image.new("RGB", (96, 96), (40, 120, 80))
    d = ImageDraw.Draw(im)
    d.ellipse((5, 20, 45, 60), fill=(200, 30, 200))
    d.rectangle((55, 30, 90, 70), fill=(250, 200, 0))
    im.save(folder / "0.png")
    return folder


QUICK = {"steps": 2, "batch_size": 2, "grad_accum": 1}


def quick_spec(method: str, model: Path, images: Path, out: Path, *, concept: dict | None = None,
               stage_overrides: dict | None = None, **experiment):
    """A RunSpec of `method` shortened for tests: every stage 2 steps at batch 2 (unless overridden)."""
    from personalize.config import load_method, resolve_runs
    from personalize.run_settings import ConceptSpec, ExperimentConfig

    overrides = {}
    for stage in load_method(method).stages:
        settings = {**QUICK, **(stage_overrides or {})}
        for key, value in settings.items():
            overrides[f"stages.{stage.name}.{key}"] = value
        if stage.embedding_norm_lock is not None:  # keep the window inside the shortened stage
            overrides[f"stages.{stage.name}.embedding_norm_lock"] = {"start": 1, "end": settings["steps"]}
    if load_method(method).class_prior is not None:
        overrides.update({"class_prior.num_images": 2, "class_prior.inference_steps": 2})
    concept = concept or {"id": "blob", "images": str(images), "super_category": "toy"}
    fields = dict(model=str(model), method=method, concepts=[ConceptSpec(**concept)], output_dir=str(out),
                  resolution=64, latent_variants=2, prior_cache_dir=str(out / "priors"),
                  samples={"prompts": ["a photo of a {subject}"], "seeds": [0], "steps": 2}, overrides=overrides)
    fields.update(experiment)
    return resolve_runs(ExperimentConfig(**fields))[0]


@pytest.fixture
def spec_for(tiny_model, concept_dir, pair_dir, tmp_path):
    def make(method: str, model: Path | None = None, **kwargs):
        if method == "disendiff" and "concept" not in kwargs:
            kwargs["concept"] = {"id": "pair", "images": str(pair_dir),
                                 "subjects": [{"super_category": "cat"}, {"super_category": "dog"}]}
        return quick_spec(method, model or tiny_model, concept_dir, tmp_path / "out", **kwargs)

    return make


@pytest.fixture(scope="session")
def local_ray():
    import ray

    from pipelines.cluster import connect

    os.environ.pop("RAY_ADDRESS", None)
    connect(num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_scorers(tmp_path_factory):
    """Small random CLIP and DINO folders (built by the test, like the evaluation tests' encoders)."""
    import open_clip
    import torch
    from transformers import ViTConfig, ViTModel

    from personalize.metrics import save_open_clip

    root = tmp_path_factory.mktemp("scorers")
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    save_open_clip(open_clip.CLIP(**cfg), cfg, root / "clip")
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=8, image_size=32, intermediate_size=64)
    ViTModel(config, add_pooling_layer=False).save_pretrained(root / "dino")
    return root / "clip", root / "dino"
