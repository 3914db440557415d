"""Keeping credentials out of MLflow, results tables and logs."""

from __future__ import annotations

import os
import re

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD",
              "MLFLOW_TRACKING_TOKEN", "HF_TOKEN", "RAY_AUTH_TOKEN")
SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|api_?key|access_?key)", re.IGNORECASE)
URL_CREDENTIALS = re.compile(r"(\w+://)[^/@\s:]+:[^/@\s]+@")


def redact(text: str) -> str:
    """Remove credentials: values of secret environment variables and user:password parts of URLs."""
    text = URL_CREDENTIALS.sub(r"\1***@", str(text))
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text
