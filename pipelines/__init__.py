"""Ray adapters around personalize: batch jobs, Ray Data stages, Ray Train wiring, MLflow, storage."""
