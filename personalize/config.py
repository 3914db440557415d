"""Loading configuration: YAML files, dotted overrides (`stages.identity.steps=200`), methods by name, experiments
and concept manifests. Every problem in a file is reported at once with the file, the key, the value received and
what was expected (the schemas: personalize/method_spec.py, personalize/run_settings.py)."""

from __future__ import annotations

import copy
import csv
import json
import posixpath
import tempfile
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from personalize import storage
from personalize.augment import ANY_SHAPE
from personalize.errors import ConfigError
from personalize.fingerprint import local_model_fingerprint
from personalize.locations import CONFIG_ROOT
from personalize.method_spec import MethodSpec, NormLockSpec, StageSpec
from personalize.run_settings import ConceptSpec, ExperimentConfig, RunSpec, ValidationSpec
from personalize.scaling import RecipeScale, load_recipe_scale, scale_recipe
from personalize.storage import is_s3


def format_validation_error(error: ValidationError, data: Any) -> list[str]:
    """One line per problem: dotted key (stages named, not numbered), value received, what is expected."""
    problems = []
    for e in error.errors():
        loc = _readable_loc(e["loc"], data)
        received = e.get("input")
        expected = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            expected = "no such key (unknown keys are errors)"
        elif e["type"] == "missing":
            problems.append(f"{loc}: missing; this key is required")
            continue
        if isinstance(received, (dict, list)):  # a check across several keys: the message names them
            problems.append(f"{loc}: {expected}")
            continue
        problems.append(f"{loc}: got {_short(received)}; {expected}")
    return problems


def _readable_loc(loc: tuple, data: Any) -> str:
    parts, node = [], data
    for key in loc:
        if isinstance(key, int) and isinstance(node, list):
            item = node[key] if key < len(node) else None
            label = item.get("name") or item.get("id") if isinstance(item, dict) else None
            parts.append(str(label) if label else f"[{key}]")
            node = item
        else:
            parts.append(str(key))
            node = node.get(key) if isinstance(node, dict) else None
    return ".".join(parts) or "(top level)"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), ["file not found"])
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(str(path), [f"not valid YAML: {e}"]) from None


def parse_override(text: str) -> tuple[str, Any]:
    """`stages.identity.steps=200` -> ("stages.identity.steps", 200); values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError("command line", [f"override {text!r} must look like key.path=value"])
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError("command line", [f"override {text!r}: the value is not valid YAML ({e})"]) from None


def apply_overrides(data: dict, overrides: dict[str, Any], source: str) -> dict:
    """Set dotted paths in a raw config dict; list items (stages) are addressed by their name."""
    data = copy.deepcopy(data)
    problems = []
    for path, value in overrides.items():
        node = data
        keys = path.split(".")
        try:
            for depth, key in enumerate(keys[:-1]):
                if depth > 0 and keys[depth - 1] == "losses" and isinstance(node.get(key), (int, float)):
                    node[key] = {"weight": node[key]}  # a loss given as its weight alone gains a parameter
                node = _child(node, key, create=True)
            last = keys[-1]
            if isinstance(node, list):
                raise KeyError(f"'{last}' addresses a list; name an item")
            node[last] = value
        except KeyError as e:
            problems.append(f"override {path}: {e.args[0]}")
    if problems:
        raise ConfigError(source, problems)
    return data


def _child(node: Any, key: str, create: bool) -> Any:
    if isinstance(node, list):
        for item in node:
            if isinstance(item, dict) and item.get("name") == key:
                return item
        names = [i.get("name") for i in node if isinstance(i, dict)]
        raise KeyError(f"no item named '{key}' (have: {names})")
    if not isinstance(node, dict):
        raise KeyError(f"'{key}' is below a value, not a section")
    if key not in node or node[key] is None:
        if not create:
            raise KeyError(f"no key '{key}'")
        node[key] = {}
    return node[key]


def method_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        return candidate
    return CONFIG_ROOT / "methods" / f"{name_or_path}.yaml"


def available_methods() -> list[str]:
    return sorted(p.stem for p in (CONFIG_ROOT / "methods").glob("*.yaml"))


def load_method(name_or_path: str, overrides: dict[str, Any] | None = None, scale: RecipeScale | None = None) -> MethodSpec:
    """A method from configs/methods (or a YAML path), scaled to the model (`scale`), then overridden."""
    path = method_path(name_or_path)
    if not path.is_file():
        raise ConfigError(
            str(path), [f"unknown method {name_or_path!r}; available: {', '.join(available_methods())}"]
        )
    raw = scale_recipe(method_data(path), scale)
    if overrides:
        raw = apply_overrides(raw, {**overrides, **_unscaled(overrides)} if scale else overrides, f"{path} (with overrides)")
    return validate(MethodSpec, raw, str(path))


def method_data(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A method file's raw data. A file may be a variant of another method: `extends: <method>` takes that method's
    data, `overrides:` sets dotted keys in it (stages by name, as on the command line), and the file's own top-level
    keys (name, paper, summary, ...) replace the parent's."""
    raw = read_yaml(path)
    if not isinstance(raw, dict) or "extends" not in raw:
        return raw
    parent_name = raw.pop("extends")
    changes = raw.pop("overrides", None) or {}
    parent = method_path(str(parent_name))
    chain = (*seen, path.resolve())
    if parent.resolve() in chain or not parent.is_file():
        problem = f"extends {parent_name!r}: " + ("a method cannot extend itself" if parent.resolve() in chain
                                                   else f"no such method; available: {', '.join(available_methods())}")
        raise ConfigError(str(path), [problem])
    if not isinstance(changes, dict):
        raise ConfigError(str(path), [f"overrides: expected a mapping of dotted keys to values, got {type(changes).__name__}"])
    data = apply_overrides(method_data(parent, chain), changes, str(path))
    data.update(raw)
    return data


def _unscaled(overrides: dict[str, Any]) -> dict[str, Any]:
    """An overridden lr or length is an effective value: its stage no longer records a model scale for it."""
    marks = {".lr": ".model_lr_scale", ".steps": ".model_steps_scale"}
    return {key.removesuffix(end) + mark: 1.0 for key in overrides for end, mark in marks.items()
            if key.endswith(end) and key.startswith(("stages.", "test_time."))}


def validate(model: type[BaseModel], data: Any, source: str):
    if not isinstance(data, dict):
        raise ConfigError(source, [f"expected a mapping at the top level, got {type(data).__name__}"])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, format_validation_error(e, data)) from None


METHOD_KEYS = set(MethodSpec.model_fields)


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route dotted overrides: keys of a method (stages, placeholder, ...) go to the method, the rest to the experiment."""
    method, experiment = {}, {}
    for key, value in overrides.items():
        head = key.removeprefix("method.").split(".")[0]
        if key.startswith("method.") or head in METHOD_KEYS:
            method[key.removeprefix("method.")] = value
        else:
            experiment[key] = value
    return method, experiment


def load_experiment(path: str | Path, cli_overrides: list[str] | None = None) -> list[RunSpec]:
    """Read an experiment file, apply file and command-line overrides, resolve one RunSpec per concept."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(str(path), ["expected a mapping at the top level"])
    overrides = dict(raw.get("overrides") or {})
    overrides.update(dict(parse_override(o) for o in cli_overrides or []))
    method_over, exp_over = split_overrides(overrides)
    raw = apply_overrides({k: v for k, v in raw.items() if k != "overrides"}, exp_over, str(path))
    raw["overrides"] = method_over
    experiment = validate(ExperimentConfig, raw, str(path))
    return resolve_runs(experiment, base_dir=path.parent)


def scale_steps(method: MethodSpec, scale: float) -> MethodSpec:
    """Every stage's length (and its warmup and norm-lock window) times `scale`, at least one step: quick trials."""
    if scale == 1.0:
        return method

    def scaled(n: int) -> int:
        return max(1, round(n * scale))

    def stage(s: StageSpec) -> StageSpec:
        update = {"steps": scaled(s.steps), "warmup_steps": round(s.warmup_steps * scale)}
        lock = s.embedding_norm_lock
        if lock is not None and lock.start is not None:  # a window in steps shrinks with the stage
            start = scaled(lock.start)
            update["embedding_norm_lock"] = NormLockSpec(start=start, end=max(start + 1, scaled(lock.end)))
        return s.model_copy(update=update)

    return method.model_copy(update={"stages": [stage(s) for s in method.stages]})


def resolve_model(model: str, base_dir: Path | None) -> str:
    """A model given as a relative path (./x, ../x) is relative to the experiment file; hub ids and uris stay."""
    if base_dir is not None and model.startswith(("./", "../")):
        return str((base_dir / model).resolve())
    return str(Path(model).expanduser()) if model.startswith("~") else model


def resolve_runs(experiment: ExperimentConfig, base_dir: Path | None = None) -> list[RunSpec]:
    model = resolve_model(experiment.model, base_dir)
    method = scale_steps(load_method(experiment.method, experiment.overrides, load_recipe_scale(model)), experiment.steps_scale)
    concepts = experiment.concepts
    if isinstance(concepts, str):
        concepts = load_manifest(concepts if is_s3(concepts) else _relative(concepts, base_dir))  # paths relative to it
    elif base_dir is not None:
        concepts = [_resolve_concept(c, base_dir) for c in concepts]
    fingerprint = local_model_fingerprint(model)
    validation = validation_with_protocol(experiment.validation, method)
    if experiment.aspect_buckets and method.augmentation not in ANY_SHAPE:
        raise ConfigError(f"method {method.name}", [f"aspect_buckets: its augmentation ({method.augmentation}) makes "
                                                     "square images only; turn aspect_buckets off for this method"])
    if experiment.aspect_buckets and method.class_prior is not None and method.class_prior.mode == "mixed":
        raise ConfigError(f"method {method.name}", ["aspect_buckets: class priors mixed into the instance slots "
                                                     "(class_prior.mode: mixed) need one shape; use mode: concat or "
                                                     "turn aspect_buckets off"])
    runs = []
    for concept in concepts:
        runs.append(
            RunSpec(
                model=model,
                model_fingerprint=fingerprint,
                method=method,
                concept=concept,
                validation=validation,
                **experiment.model_dump(exclude={"model", "method", "concepts", "overrides", "steps_scale", "validation"}),
            )
        )
    return runs


def validation_with_protocol(validation: ValidationSpec | None, method: MethodSpec) -> ValidationSpec | None:
    """The run's validation with what it leaves unset (every, selection, objective) from the method's protocol."""
    if validation is None:
        return None
    protocol, given = method.validation, validation.model_fields_set
    update = {}
    if protocol is not None:
        total = sum(s.steps for s in method.stages)
        update = {"every": max(1, round(total * protocol.every_fraction)), "selection": protocol.selection,
                  "objective": protocol.objective}
        update = {k: v for k, v in update.items() if k not in given}
    elif validation.every is None:
        raise ConfigError("validation", [f"validation.every is unset and {method.name} has no validation protocol: "
                                          "give validation.every (a point every N steps)"])
    return validation.model_copy(update=update)


def _resolve_concept(concept: ConceptSpec, base_dir: Path | str) -> ConceptSpec:
    """Image, mask and holdout folders relative to the file that names them (uris stay as they are). A manifest
    in a bucket (`base_dir` an s3:// prefix) resolves them inside that bucket."""
    update = {}
    for key in ("images", "masks", "holdout"):
        value = getattr(concept, key)
        if value and "://" not in value:
            if is_s3(base_dir):
                update[key] = _in_bucket(str(base_dir), value)
            else:
                update[key] = str(_relative(value, Path(base_dir)))
    return concept.model_copy(update=update)


def _in_bucket(base_uri: str, value: str) -> str:
    """A folder named in a manifest stored at `base_uri`, inside that manifest's bucket."""
    bucket = base_uri.removeprefix("s3://").split("/", 1)[0]
    if value.startswith(("/", "~")):
        raise ValueError(f"{value!r} is a path on some machine, but the manifest is in bucket {bucket}: give a folder "
                         "relative to the manifest or an s3:// uri")
    resolved = posixpath.normpath(posixpath.join(base_uri.removeprefix("s3://"), value))
    if resolved.split("/", 1)[0] != bucket or "/" not in resolved:
        raise ValueError(f"{value!r} leaves bucket {bucket}: give a folder inside it, or an s3:// uri")
    return f"s3://{resolved}"


def _relative(path: str, base_dir: Path | None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or base_dir is None else (base_dir / p).resolve()


def read_manifest(path: str | Path, base_dir: str | None = None) -> tuple[list[ConceptSpec], dict[str, str]]:
    """The good concepts of a YAML list, JSON lines or CSV file (a local path or an s3:// uri), and label -> reason
    for each bad row. A file that cannot be read as a list of concepts at all is a ConfigError."""
    if is_s3(path):
        return _read_manifest_in_bucket(str(path))
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), ["concepts manifest not found"])
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        rows = read_yaml(path)
        rows = rows.get("concepts", rows) if isinstance(rows, dict) else rows
    elif suffix in (".jsonl", ".json"):
        rows, bad = [], []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    bad.append(f"line {number}: not valid JSON ({e.msg})")
        if bad:
            raise ConfigError(str(path), bad)
    elif suffix == ".csv":
        with path.open(newline="") as f:
            rows = [{k: v for k, v in r.items() if v not in (None, "")} for r in csv.DictReader(f)]
    else:
        raise ConfigError(str(path), [f"unknown manifest format {suffix!r}; use .yaml, .jsonl or .csv"])
    if not isinstance(rows, list) or not rows:
        raise ConfigError(str(path), ["expected a non-empty list of concepts"])
    return _validate_rows(rows, path, base_dir or path.parent)


def _read_manifest_in_bucket(uri: str) -> tuple[list[ConceptSpec], dict[str, str]]:
    """A manifest stored in a bucket: read through a temporary copy, its relative folders resolved in the bucket."""
    try:
        data = storage.read_bytes(uri)
    except Exception as e:  # botocore's NoSuchKey, NoSuchBucket, endpoint errors: one line for the user
        raise ConfigError(uri, [f"concepts manifest cannot be read ({type(e).__name__}: {e}); upload it there or "
                                "correct the uri"]) from None
    with tempfile.TemporaryDirectory() as folder:
        copy_path = Path(folder) / posixpath.basename(uri)
        copy_path.write_bytes(data)
        try:
            return read_manifest(copy_path, base_dir=uri.rsplit("/", 1)[0])
        except ConfigError as e:
            raise ConfigError(uri, e.problems) from None


def load_manifest(path: str | Path) -> list[ConceptSpec]:
    """Concepts from a YAML list, JSON lines or CSV file; all bad rows are reported together."""
    concepts, bad = read_manifest(path)
    if bad:
        raise ConfigError(str(path), [f"concept {label}: {reason}" for label, reason in bad.items()])
    return concepts


def _validate_rows(rows: list, path: Path, base_dir: Path | str) -> tuple[list[ConceptSpec], dict[str, str]]:
    """Valid concepts, and label -> reason for each row that is not (a duplicated id fails every row holding it)."""
    concepts, bad = [], {}
    for i, row in enumerate(rows):
        label = str(row.get("id", f"[{i}]")) if isinstance(row, dict) else f"[{i}]"
        try:
            concepts.append(_resolve_concept(ConceptSpec.model_validate(row), base_dir))
        except ValidationError as e:
            bad[label if label not in bad else f"{label} (row {i + 1})"] = "; ".join(format_validation_error(e, row))
        except ValueError as e:  # a folder that cannot be resolved where the manifest is
            bad[label if label not in bad else f"{label} (row {i + 1})"] = str(e)
    ids = [c.id for c in concepts]
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        folders = ", ".join(c.images for c in concepts if c.id == dup)
        bad[dup] = f"concept id {dup!r} appears more than once (images {folders}); give each concept its own id"
    return [c for c in concepts if c.id not in bad], bad
