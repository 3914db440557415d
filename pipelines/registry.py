"""A finished run as an MLflow model: a pyfunc that loads the base model by its id or uri, applies the run's
learned state (placeholder rows, trained UNet modules, LoRA adapters; safetensors only) and generates images from prompts.

    model = mlflow.pyfunc.load_model("models:/<experiment>.<concept>@champion")
    frame = model.predict(pd.DataFrame({"prompt": ["a {} on the beach"], "seed": [0]}))  # '{}' = the subject
    image = PIL.Image.open(io.BytesIO(base64.b64decode(frame["image_png"][0])))
"""

from __future__ import annotations

import base64
import io
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from personalize.export import EMBEDS, LORA, PLACEHOLDERS, UNET
from personalize.run_folder import DONE, RESOLVED_CONFIG, finished_spec

LEARNED_FILES = (DONE, RESOLVED_CONFIG, PLACEHOLDERS, EMBEDS, UNET, LORA)


class PersonalizedModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from personalize.sampling import LoadedRun

        self.run = LoadedRun(context.artifacts["run"])
        self.pipe = self.run.pipeline(self.run.spec.method.evaluation.scheduler)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from personalize.sampling import generate

        params = params or {}
        protocol = self.run.spec.method.evaluation
        prompts = [self.run.fill(p) for p in model_input["prompt"]]
        seeds = list(model_input["seed"]) if "seed" in model_input else list(range(len(prompts)))
        images = generate(self.pipe, prompts, seeds, self.run.spec.resolution, int(params.get("steps", protocol.steps)),
                          float(params.get("guidance_scale", protocol.guidance_scale)))
        encoded = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            encoded.append(base64.b64encode(buffer.getvalue()).decode())
        return pd.DataFrame({"prompt": prompts, "seed": seeds, "image_png": encoded})


def learned_folder(run_dir: Path, target: Path) -> Path:
    """The files a run needs on top of its base model (no checkpoints, no latents)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in LEARNED_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, target / name)
    return target


def signature(run_dir: Path):
    """What the model takes and gives, stated (so MLflow infers nothing): prompts with '{}' for the subject and
    optional seeds; PNG images back. Its parameters default to the method's sampling protocol."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    protocol = finished_spec(run_dir).method.evaluation
    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed", required=False)]),
        outputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed"), ColSpec("string", "image_png")]),
        params=ParamSchema([ParamSpec("steps", "long", protocol.steps), ParamSpec("guidance_scale", "double", protocol.guidance_scale)]),
    )


@contextmanager
def registration_notices_off():
    """MLflow prints each registration ("Successfully registered model ...", "Created version ...") to stderr, a
    few lines per run: shown with -v only (the batch logs the versions itself)."""
    from mlflow.utils import logging_utils

    from pipelines.cluster import verbose

    shown = logging_utils.MLFLOW_LOGGING_STREAM.enabled
    if not verbose():
        logging_utils.disable_logging()
    try:
        yield
    finally:
        logging_utils.MLFLOW_LOGGING_STREAM.enabled = shown


def log_personalized_model(run_id: str, run_dir: Path, registered_name: str) -> str:
    """Log the pyfunc into the child run and register it; returns the new model version."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id, nested=True), warnings.catch_warnings(), \
            registration_notices_off():
        # the signature is stated; an input example would make MLflow load the model and generate to check it
        warnings.filterwarnings("ignore", message=r".*An input example was not provided")  # MLflow colours it
        folder = learned_folder(Path(run_dir), Path(tmp) / "run")
        info = mlflow.pyfunc.log_model(
            name="personalized", python_model=str(Path(__file__).with_name("pyfunc_entry.py")), artifacts={"run": str(folder)},
            registered_model_name=registered_name, pip_requirements=["torch", "diffusers", "transformers", "safetensors"],
            signature=signature(Path(run_dir)),
        )
    return str(info.registered_model_version)
