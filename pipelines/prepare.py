"""Prepare a batch with Ray Data: validate every concept's images in parallel, encode instance latents on an
actor pool, and generate missing class-prior sets on an actor pool into their content-addressed folders.

The callable classes wrap `personalize` functions, so they run (and are tested) without Ray as well.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import ray

from personalize.errors import ConceptError
from personalize.images import load_concept_captions, load_concept_images
from personalize.run_settings import RunSpec
from pipelines.redaction import redact

log = logging.getLogger(__name__)


def validate_row(row: dict) -> dict:
    """One concept: can its images be read and used at this resolution? Never raises for bad input."""
    try:
        count = len(load_concept_images(row["id"], row["images"], int(row["resolution"])))
        load_concept_captions(row["id"], row["images"])
        return {**row, "ok": True, "reason": "", "images_found": count}
    except ConceptError as e:
        return {**row, "ok": False, "reason": str(e), "images_found": 0}


def validate_concepts(specs: list[RunSpec]) -> dict[str, str]:
    """Concept id -> reason for every concept that cannot be used (read in parallel with Ray Data)."""
    rows = {s.concept.id: {"id": s.concept.id, "images": s.concept.images, "resolution": s.resolution} for s in specs}
    checked = ray.data.from_items(list(rows.values())).map(validate_row, num_cpus=0.5).take_all()
    bad = {r["id"]: r["reason"] for r in checked if not r["ok"]}
    for reason in bad.values():
        log.error("skipping %s", redact(reason))
    return bad


def refuse_runs(specs: list[RunSpec], model_path: Path) -> dict[str, str]:
    """Run folder -> reason for every run that cannot train although its concept's photos are fine: its method
    locates the class token while the class is several tokens ("fire truck" for AttnDreamBooth, say), or it masks
    the loss and the concept's masks are missing. Refused here (tokenizer and file names only), before training."""
    from transformers import CLIPTokenizer

    from personalize.run_context import check_class_words, mask_files

    tokenizer = CLIPTokenizer.from_pretrained(model_path, subfolder="tokenizer")
    refused = {}
    for spec in specs:
        try:
            check_class_words(spec, tokenizer)
            if spec.masked_loss:
                mask_files(spec)
        except ConceptError as e:
            refused[str(spec.run_dir)] = str(e)
            log.error("skipping %s / %s: %s", spec.concept.id, spec.method.name, redact(str(e)))
    return refused


class LatentEncoder:
    """Actor: the base model's VAE loaded once; encodes each run's augmented instance images into the cache."""

    def __init__(self, model: str, device: str = "auto"):
        from personalize.devices import resolve_device
        from personalize.models import load_components

        self.components = load_components(model)
        self.device = resolve_device(device)
        self.components.vae.to(self.device).eval()

    def encode(self, spec: RunSpec):
        from personalize.run_context import encode_instances

        images = load_concept_images(spec.concept.id, spec.concept.images, spec.resolution)
        return encode_instances(spec, images, self.components, self.device)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from functools import partial

        from personalize.data import cached_instance_bank
        from personalize.run_context import instance_bank_key

        keys = []
        for spec_json in batch["spec"]:
            spec = RunSpec.model_validate_json(spec_json)
            key = instance_bank_key(spec, self.components.path)
            cached_instance_bank(Path(spec.latent_cache_dir), key, partial(self.encode, spec))
            keys.append(key)
        return pd.DataFrame({"key": keys})


class PriorGenerator:
    """Actor: the base pipeline loaded once; generates chunks of class-prior images into their parts folders."""

    def __init__(self, model: str, device: str = "auto"):
        from personalize.devices import resolve_device
        from personalize.models import load_components

        self.components = load_components(model)
        device = resolve_device(device)
        for module in (self.components.vae, *self.components.models.values()):
            module.to(device).eval()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from personalize.priors import generate_prior_images

        for request_json, group in batch.groupby("request"):
            generate_prior_images(self.components, _request_from_json(request_json), group["index"].tolist())
        return pd.DataFrame({"done": [True] * len(batch)})


def _request_to_json(request) -> str:
    import json

    return json.dumps({"folder": str(request.folder), "prompt": request.prompt, "seeds": list(request.seeds),
                       "spec": request.spec.model_dump(mode="json"), "resolution": request.resolution})


def _request_from_json(text: str):
    import json

    from personalize.method_spec import ClassPriorSpec
    from personalize.priors import PriorRequest

    d = json.loads(text)
    return PriorRequest(Path(d["folder"]), d["prompt"], tuple(d["seeds"]), ClassPriorSpec(**d["spec"]), d["resolution"])


def actor_resources(use_gpu: bool) -> dict:
    return {"num_gpus": 1} if use_gpu else {"num_cpus": 1}


def latents_to_encode(specs: list[RunSpec], model_path: Path) -> list[RunSpec]:
    """One run per instance bank the batch still lacks: a finished run needs none, nor does one whose folder holds
    another configuration's run (it fails without training), and a cached bank is not encoded again, so a
    resubmitted batch starts no encoding actor at all. (A run that trains without its bank encodes it itself.)"""
    from personalize.data import cached_bank_path
    from personalize.run_context import instance_bank_key
    from personalize.run_folder import owner, read_done

    todo = {}
    for spec in specs:
        holder = owner(spec.run_dir)
        if holder is not None and (not spec.owns(holder) or read_done(spec.run_dir) is not None):
            continue
        key = instance_bank_key(spec, model_path)
        if spec.latent_cache_dir and cached_bank_path(spec.latent_cache_dir, key).is_file():
            continue
        todo.setdefault(key, spec)
    return list(todo.values())


def encode_latents(specs: list[RunSpec], model: str, model_path: Path, actors: int, use_gpu: bool) -> int:
    """Encode every instance bank the batch lacks on an actor pool; returns how many were encoded."""
    todo = latents_to_encode(specs, model_path)
    if not todo:
        return 0
    ds = ray.data.from_items([{"spec": s.model_dump_json()} for s in todo])
    ds.map_batches(LatentEncoder, fn_constructor_kwargs={"model": model}, batch_size=1, batch_format="pandas",
                   compute=ray.data.ActorPoolStrategy(size=actors), **actor_resources(use_gpu)).take_all()
    return len(todo)


def generate_priors(specs: list[RunSpec], model_path: Path, model: str, actors: int, use_gpu: bool, root=None,
                    chunk: int = 8) -> int:
    """Generate every missing class-prior set the batch needs (shared by concepts of a class and, through the
    storage root, by later batches); returns how many were generated."""
    from personalize.priors import MANIFEST, finalize_prior_folder, prior_request

    requests = {}
    for spec in specs:
        if spec.method.class_prior and not spec.method.class_prior.folder and any(s.use_class_prior for s in spec.method.stages):
            r = prior_request(model_path, spec.method.class_prior, [s.super_category for s in spec.concept.subjects],
                              spec.seed, spec.resolution, Path(spec.prior_cache_dir))
            requests[r.folder] = r
    if root is not None:
        for r in requests.values():
            if not r.complete:
                root.pull(root.relative(r.folder), marker=MANIFEST)
    missing = [r for r in requests.values() if not r.complete]
    if not missing:
        return 0
    rows = [{"request": _request_to_json(r), "index": i} for r in missing for i in range(len(r.seeds))]
    ds = ray.data.from_items(rows)
    ds.map_batches(PriorGenerator, fn_constructor_kwargs={"model": model}, batch_size=chunk, batch_format="pandas",
                   compute=ray.data.ActorPoolStrategy(size=actors), **actor_resources(use_gpu)).take_all()
    for r in missing:
        finalize_prior_folder(r)
        if root is not None:
            root.push(root.relative(r.folder), marker=MANIFEST)
    return len(missing)
