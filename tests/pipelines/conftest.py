"""A local Ray for the pipeline tests (one per session: starting Ray costs seconds), and batch configs."""

import os

import pytest
import yaml

from tests.conftest import draw_concept


def batch_file(folder, tiny_model, scorers, storage, concepts=None, **extra) -> str:
    concepts = concepts or [{"id": "ball", "images": str(draw_concept(folder / "ball", n=3)), "super_category": "ball"}]
    config = {
        "name": "test-batch", "model": str(tiny_model), "methods": ["textual_inversion", "rare_two_stage_lora"],
        "concepts": concepts, "storage": str(storage), "resolution": 64, "latent_variants": 1,
        "samples": {"steps": 1, "seeds": [0], "heatmaps": False},
        "method_overrides": {"textual_inversion": {"stages.embedding.steps": 3, "stages.embedding.batch_size": 1},
                             "rare_two_stage_lora": {"stages.token.steps": 2, "stages.model.steps": 2}},
        "evaluation": {"prompts": "personalize_eval", "samples": 1, "steps": 1, "clip": str(scorers[0]), "dino": str(scorers[1])},
        "resources": {"max_concurrent_runs": 2},
        "tracking": {"enabled": False},
    }
    for key, value in extra.items():
        config[key] = value
    path = folder / "batch.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """A real SeaweedFS S3 server on loopback (ports shifted so a running stack is not disturbed, and below
    10002 so that none falls in the range in-process Ray hands to its workers)."""
    from pipelines.stack import Ports, Stack

    stack = Stack(tmp_path_factory.mktemp("seaweed"), Ports.offset(-2000))
    stack.up(only=("seaweedfs",), timeout=120)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "AWS_REGION")}
    env = stack.client_env()
    for key in saved:
        os.environ[key] = env[key]
    yield stack
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    stack.down()


@pytest.fixture
def ray_with_s3(seaweedfs, local_ray):
    """The session's Ray started again once the S3 settings exist, so that its processes hold the credentials
    (as a cluster's nodes do: credentials are never passed through Ray's runtime environment)."""
    from pipelines.cluster import connect

    local_ray.shutdown()
    connect(num_cpus=4)
    yield local_ray
