"""MLflow "model from code" entry: logging stores this file instead of a pickled object, so loading a
registered model never unpickles anything (the learned state itself is safetensors)."""

import mlflow

from pipelines.registry import PersonalizedModel

mlflow.models.set_model(PersonalizedModel())
