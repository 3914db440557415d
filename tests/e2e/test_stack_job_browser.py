"""End to end, as a user runs it: `personalize stack up` (SeaweedFS, MLflow server, Ray head on 127.0.0.1),
`ray job submit ... -- personalize batch` with S3 storage and tracking, the results table in S3, the MLflow UI
in a real (headless) browser, and `personalize stack down` leaving none of our processes behind."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines.stack import Ports, Stack
from tests.conftest import draw_concept

pytestmark = pytest.mark.slow
WORLD = Path(__file__).resolve().parents[2] / "models" / "microworld"  # its CLIP and identity encoder score the runs
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def our_processes(*markers: Path) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(str(m) in cmd for m in markers) and int(proc.name) != os.getpid():
                found.append(f"{proc.name}: {cmd[:120]}")
    return found


@pytest.fixture
def stack(tmp_path):
    stack = Stack(tmp_path / "stack", Ports.offset(-2500))
    began = time.perf_counter()
    try:
        stack.up(timeout=240)
    except Exception:
        stack.down()
        raise
    first = time.perf_counter() - began
    pids = {name: stack._alive(name) for name in ("seaweedfs", "mlflow", "ray")}
    stack.up()  # a second `up` is harmless: same processes, still healthy
    assert {name: stack._alive(name) for name in pids} == pids
    (tmp_path / "stack-up-seconds.txt").write_text(f"{first:.1f}\n")
    yield stack
    stack.down()
    assert our_processes(stack.folder, stack.ray_temp) == []
    assert all(v.startswith("down") for v in stack.status().values())


def test_batch_job_on_the_local_stack_shows_up_in_the_mlflow_ui(stack, tiny_model, tmp_path, monkeypatch):
    from personalize import storage

    env = stack.client_env()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.setenv(key, env[key])
    for name in ("ball", "box"):
        storage.upload_dir(draw_concept(tmp_path / name, n=3, seed=len(name)), f"s3://personalize/e2e/concepts/{name}")
    job = tmp_path / "job"
    job.mkdir()
    (job / "batch.yaml").write_text(yaml.safe_dump({
        "name": "e2e", "model": str(tiny_model), "methods": ["rare_two_stage"],
        "concepts": [{"id": n, "images": f"s3://personalize/e2e/concepts/{n}", "super_category": n} for n in ("ball", "box")],
        "storage": "s3://personalize/e2e/store", "resolution": 64, "latent_variants": 1,
        "samples": {"steps": 1, "seeds": [0], "heatmaps": False},
        "method_overrides": {"rare_two_stage": {"stages.token.steps": 2, "stages.model.steps": 2}},
        "evaluation": {"prompts": "world_eval", "samples": 1, "steps": 1, "clip": str(WORLD / "clip"), "dino": str(WORLD / "identity")},
        "resources": {"max_concurrent_runs": 2}, "tracking": {"experiment": "e2e"},
    }))
    submit = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", env["RAY_ADDRESS"],
              "--working-dir", str(job), "--", sys.executable, "-m", "pipelines.batch", "batch.yaml"]
    done = subprocess.run(submit, env={**os.environ, **env}, capture_output=True, text=True, timeout=900)
    log = done.stdout[-4000:] + done.stderr[-2000:]
    assert done.returncode == 0, log
    assert "succeeded" in done.stdout
    results = storage.read_bytes("s3://personalize/e2e/store/results/results.md").decode()
    for concept in ("ball", "box"):
        assert f"| {concept} | rare_two_stage | finished |" in results
    assert storage.exists("s3://personalize/e2e/store/runs/ball/rare_two_stage/DONE.json")
    assert storage.exists("s3://personalize/e2e/store/runs/box/rare_two_stage/unet.safetensors")
    artifacts = [k for k, _ in storage.list_keys("s3://mlflow/artifacts")]
    assert any(k.endswith("learned/learned_embeds.safetensors") for k in artifacts)  # MLflow artifacts live in SeaweedFS
    check_eval_metrics(env["MLFLOW_TRACKING_URI"], results + log)
    check_mlflow_ui(env["MLFLOW_TRACKING_URI"], tmp_path / "mlflow-ui.png")


def check_eval_metrics(url: str, context: str) -> None:
    """Each child run holds its evaluation as finite eval/* metrics (what the UI is then asked to show)."""
    import math

    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("e2e")
    children = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("mlflow.parentRunId")]
    assert len(children) == len(CHILDREN), context
    for run in children:
        values = {k: run.data.metrics.get(k) for k in ("eval/clip_t", "eval/clip_i", "eval/dino")}
        assert all(v is not None and math.isfinite(v) for v in values.values()), f"{run.info.run_name}: {values}\n{context}"


def check_mlflow_ui(url: str, screenshot: Path) -> None:
    """The runs table lists the batch's parent with one child per (concept, method), and each child's page shows
    its evaluation metrics; the metrics are also added as columns of the table for the screenshot."""
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium is not installed (make test installs it)"
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("e2e")
    children = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])
                if r.data.tags.get("mlflow.parentRunId")}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        # MLflow 3 opens an experiment on its GenAI overview: go to the runs table, close the assistant panel,
        # expand the batch's parent run
        page.goto(f"{url}/#/experiments/{experiment.experiment_id}/runs", wait_until="load", timeout=60_000)
        expand = page.locator("button[data-component-id*='runnamecellrenderer']").first  # the parent run "e2e"
        expand.wait_for(timeout=60_000)
        page.wait_for_timeout(1000)
        close = page.get_by_role("button", name="Close")
        if close.count():
            close.first.click()
        expand.click()
        for name in CHILDREN:
            page.get_by_text(name, exact=True).first.wait_for(timeout=30_000)
        rows = [n for n in CHILDREN if page.get_by_text(n, exact=True).count() == 1]
        headers = add_metric_columns(page)
        page.screenshot(path=str(screenshot), full_page=True)
        shown = {}
        for name in CHILDREN:  # each child run's own page lists its evaluation metrics
            page.goto(f"{url}/#/experiments/{experiment.experiment_id}/runs/{children[name].info.run_id}", wait_until="load")
            page.get_by_text("eval/clip_t", exact=True).first.wait_for(timeout=30_000)
            shown[name] = [k for k in METRICS if page.get_by_text(k, exact=True).count() >= 1]
        browser.close()
    assert sorted(rows) == sorted(CHILDREN)  # one child run per (concept, method), each shown once
    assert shown == {name: list(METRICS) for name in CHILDREN}
    if headers is not None:
        assert set(METRICS) <= set(headers), headers


CHILDREN = ("ball / rare_two_stage", "box / rare_two_stage")
METRICS = ("eval/clip_t", "eval/clip_i", "eval/dino")


def add_metric_columns(page) -> list[str] | None:
    """Adds the evaluation metrics as columns through the column picker; returns the table's headers, or None
    (with a warning naming what the page showed) when this MLflow UI's picker does not offer them."""
    import warnings

    page.get_by_test_id("column-selection-dropdown").first.click()
    page.get_by_placeholder("Search columns").fill("eval/")
    for column in METRICS:
        option = page.get_by_text(column, exact=True).first
        try:
            option.wait_for(timeout=20_000)
        except Exception:
            warnings.warn(f"the column picker did not offer {column}; it showed: {page.locator('body').inner_text()[-1500:]}", stacklevel=2)
            page.keyboard.press("Escape")
            return None
        option.click()
    page.keyboard.press("Escape")
    page.wait_for_timeout(500)
    return page.locator("[role=columnheader]").all_inner_texts()
