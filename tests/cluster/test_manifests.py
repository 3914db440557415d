"""The cluster manifests, checked the way the tools that read them check: Ray's cluster-launcher validation for
cluster/aws.yaml, the KubeRay CRD schemas (vendored) for cluster/kuberay/, plus what ties them to this project:
one image built by cluster/Dockerfile, the pinned Ray version, a job entrypoint that parses, no inline secrets."""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
SECRET_NAMES = re.compile(r"AWS_ACCESS_KEY_ID|(^|_)(TOKEN|PASSWORD|SECRET)(_|$)", re.I)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def crd_schema(name: str) -> dict:
    crd = load(KUBERAY / "schemas" / f"ray.io_{name}.yaml")
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Keys the schema does not define (what `kubectl apply --validate=strict` rejects); a plain JSON-Schema
    validator lets them through, since structural schemas leave additionalProperties unset."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, dict):
        properties = schema.get("properties")
        if properties is None:
            extra = schema.get("additionalProperties")
            return [f for k, v in value.items() for f in unknown_fields(v, extra, f"{path}.{k}")] if isinstance(extra, dict) else []
        found = []
        for key, item in value.items():
            found += [f"{path}.{key}"] if key not in properties else unknown_fields(item, properties[key], f"{path}.{key}")
        return found
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [f for i, item in enumerate(value) for f in unknown_fields(item, schema["items"], f"{path}[{i}]")]
    return []


def check_against_crd(manifest: dict, name: str) -> None:
    schema = crd_schema(name)
    jsonschema.Draft7Validator(schema).validate(manifest)
    assert unknown_fields(manifest, schema) == []


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


# ---- KubeRay ----

def test_the_raycluster_validates_against_kuberays_crd():
    check_against_crd(load(KUBERAY / "raycluster.yaml"), "rayclusters")


def test_the_rayjob_validates_against_kuberays_crd():
    check_against_crd(load(KUBERAY / "rayjob.yaml"), "rayjobs")


def test_the_crd_check_refuses_a_misspelt_field_and_a_wrong_type():
    cluster = load(KUBERAY / "raycluster.yaml")
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = 8
    assert unknown_fields(typo, crd_schema("rayclusters")) == [".spec.workerGroupSpecs[0].maxReplica"]
    wrong = copy.deepcopy(cluster)
    wrong["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    with pytest.raises(jsonschema.ValidationError, match="'eight' is not of type 'integer'"):
        jsonschema.Draft7Validator(crd_schema("rayclusters")).validate(wrong)


def test_the_cluster_has_a_gpu_worker_group_that_scales_from_zero():
    spec = load(KUBERAY / "raycluster.yaml")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no runs on the head
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
    (worker,) = containers(group["template"])
    assert worker["resources"]["limits"]["nvidia.com/gpu"] >= 1


def test_storage_and_tracking_settings_come_from_a_secret_never_inline():
    spec = load(KUBERAY / "raycluster.yaml")["spec"]
    pods = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
    for pod in pods:
        for container in containers(pod):
            assert {"secretRef": {"name": "personalize-env"}} in container["envFrom"]
            assert not [e["name"] for e in container.get("env", []) if "value" in e and SECRET_NAMES.search(e["name"])]
    job = load(KUBERAY / "rayjob.yaml")
    assert not [name for name in yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"] if SECRET_NAMES.search(name)]
    texts = "".join(p.read_text() for p in (KUBERAY / "rayjob.yaml", KUBERAY / "raycluster.yaml", CLUSTER / "aws.yaml"))
    # an access key id, or a secret given a value (the README's `--from-literal=...=...` lines show none)
    assert not re.search(r"AKIA[0-9A-Z]{16}|(SECRET|PASSWORD)[A-Z_]*[=:] *(?!\.\.\.)[^\s.]", texts)


def test_the_rayjob_runs_on_the_raycluster_and_its_entrypoint_is_a_batch_this_project_parses():
    from pipelines.config import load_batch

    job = load(KUBERAY / "rayjob.yaml")["spec"]
    assert job["clusterSelector"] == {"ray.io/cluster": load(KUBERAY / "raycluster.yaml")["metadata"]["name"]}
    yaml.safe_load(job["runtimeEnvYAML"])
    command, subcommand, config, *overrides = shlex.split(job["entrypoint"])
    assert (command, subcommand) == ("personalize", "batch")
    workdir = dockerfile_workdir()
    assert config.startswith(workdir + "/")  # absolute: a job's working directory is Ray's, not the image's
    batch, _ = load_batch(ROOT / config.removeprefix(workdir + "/"), overrides)
    assert batch.storage.startswith("s3://") and batch.concepts.startswith("s3://")
    assert batch.resources.gpus_per_run == 1


# ---- one image, one Ray ----

def test_every_manifest_runs_the_image_the_dockerfile_builds_at_the_pinned_ray():
    """One image everywhere, tagged with the project's version (its registry is the user's to put in front)."""
    tag = f"personalize:{project_version()}"
    assert f"-t {tag} ." in (CLUSTER / "Dockerfile").read_text()
    cluster = load(KUBERAY / "raycluster.yaml")["spec"]
    pods = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"]),
            load(KUBERAY / "rayjob.yaml")["spec"]["submitterPodTemplate"]]
    images = {c["image"] for pod in pods for c in containers(pod)} | {load(CLUSTER / "aws.yaml")["docker"]["image"]}
    assert len(images) == 1 and images.pop().rsplit("/", 1)[-1] == tag
    assert cluster["rayVersion"] == ray.__version__


def dockerfile_workdir() -> str:
    (workdir,) = re.findall(r"^WORKDIR (\S+)$", (CLUSTER / "Dockerfile").read_text(), re.M)
    return workdir


def test_the_dockerfile_installs_the_project_as_the_readme_does():
    text = (CLUSTER / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM python:(\d+)\.(\d+)-slim$", text, re.M)
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert tuple(int(x) for x in base) >= tuple(int(x) for x in required.removeprefix(">=").split("."))
    assert re.search(r"^RUN make venv\b", text, re.M)  # the Makefile's recipe: torch pair first, then the project
    assert re.search(rf"^ENV PATH={re.escape(dockerfile_workdir())}/\.venv/bin:\$PATH", text, re.M)
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "outputs", "mlruns", ".stack", ".git"} <= ignored
    assert not {"models", "configs", "personalize"} & ignored  # the micro world and the code go in


# ---- Ray's cluster launcher ----

def test_the_aws_config_passes_rays_own_cluster_config_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(CLUSTER / "aws.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))
    typo = copy.deepcopy(config)
    typo["available_node_types"]["gpu_worker"]["min_wrkers"] = 1
    with pytest.raises(jsonschema.ValidationError, match="'min_wrkers' was unexpected"):
        validate_config(prepare_config(typo))


def test_the_aws_cluster_scales_gpu_workers_and_keeps_the_dashboard_on_loopback():
    config = load(CLUSTER / "aws.yaml")
    types = config["available_node_types"]
    head, worker = types[config["head_node_type"]], types["gpu_worker"]
    assert head["resources"] == {"CPU": 0} and head["max_workers"] == 0
    assert worker["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4d.", "p5."))  # a GPU instance
    assert worker["min_workers"] == 0 and worker["max_workers"] == config["max_workers"] >= 1
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "--disable-usage-stats" in start
