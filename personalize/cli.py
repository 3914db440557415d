"""The `personalize` command line's own subcommands (train, sample, evaluate, methods, ...); the Ray ones
(batch, sweep, stack, demo) are added by cluster/cli.py."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from personalize.errors import PersonalizeError
from personalize.plugins import load_plugins
from personalize.quiet import quiet_libraries

Commands = dict[str, tuple[str, Callable[[list[str]], int]]]


def cmd_tiny_model(args) -> int:
    from personalize.models import TINY_ARCHS, build_tiny_model

    path = build_tiny_model(args.directory, seed=args.seed, arch=TINY_ARCHS[args.arch])
    print(f"tiny Stable Diffusion pipeline ({args.arch} layout) written to {path}")
    return 0


def cmd_methods(args) -> int:
    from personalize.config import available_methods, load_method
    from personalize.methods_table import method_table
    from personalize.scaling import SCALE_FILE, describe_scale, load_recipe_scale

    scale = load_recipe_scale(args.model) if args.model else None
    if args.model:
        print(f"{args.model}: " + (describe_scale(scale) if scale else f"no {SCALE_FILE}, the papers' numbers") + "\n")
    for name in available_methods():
        print(method_table(load_method(name, scale=scale)))
        print()
    return 0


def cmd_train(args) -> int:
    from personalize.config import load_experiment
    from personalize.train_many import train_all

    runs = load_experiment(args.config, args.overrides)
    outcomes = train_all(runs, resume=args.resume)
    return 0 if any(o.status in ("finished", "skipped") for o in outcomes) else 1


def cmd_draw_concepts(args) -> int:
    from personalize.synthetic import write_concepts

    manifest = write_concepts(args.directory, photos=args.photos, size=args.size)
    print(f"concepts drawn; manifest: {manifest}")
    return 0


def cmd_sample(args) -> int:
    from personalize.image_editing import build_edit_pipeline, generate_from_image
    from personalize.sampling import LoadedRun, generate, image_grid

    start, mask = _edit_inputs(args)
    run = LoadedRun(args.run, device=args.device)
    out = Path(args.out or Path(args.run) / "generated")
    out.mkdir(parents=True, exist_ok=True)
    for index, template in enumerate(args.prompt):
        if args.tto:
            from safetensors.torch import save_file

            from personalize.tto import optimize_for_prompt

            rows = optimize_for_prompt(run, template, steps=args.tto_steps)
            save_file({"rows": rows.cpu()}, str(out / f"prompt{index:02d}.tto.safetensors"), metadata={"prompt": template})
        prompt = run.fill(template)
        if start is None:
            images = generate(run.pipeline(args.scheduler), [prompt] * len(args.seeds), args.seeds, run.spec.resolution,
                              args.steps, args.guidance)
        else:
            edit = build_edit_pipeline(run.components, args.scheduler, inpaint=mask is not None)
            images = generate_from_image(edit, [prompt] * len(args.seeds),
                                         args.seeds, start, run.spec.resolution, mask, args.strength, args.steps, args.guidance)
        for seed, image in zip(args.seeds, images):
            image.save(out / f"prompt{index:02d}-seed{seed}.png")
        image_grid(images, len(images), [prompt]).save(out / f"prompt{index:02d}-grid.png")
        print(f"{prompt!r}: {len(images)} images in {out}" + (" (after test-time optimisation)" if args.tto else ""))
    return 0


def _edit_inputs(args):
    """The starting image and mask of an img2img / inpainting call, checked before any model is loaded."""
    from PIL import Image

    from personalize.errors import ConfigError

    problems = []
    if args.mask and not args.image:
        problems.append("--mask needs --image (the photo to inpaint)")
    if args.strength is not None and not args.image:
        problems.append("--strength needs --image (it says how much of the photo is repainted)")
    if args.strength is not None and not 0.0 < args.strength <= 1.0:
        problems.append(f"--strength must be in (0, 1], got {args.strength}")
    for flag, path in (("--image", args.image), ("--mask", args.mask)):
        if path and not Path(path).is_file():
            problems.append(f"{flag} {path}: no such file")
    if problems:
        raise ConfigError("command line", problems)
    if args.strength is None:
        args.strength = 0.75
    opened = [Image.open(p) if p else None for p in (args.image, args.mask)]
    return opened[0], opened[1]


def cmd_export(args) -> int:
    from personalize.export_formats import export_run

    out = Path(args.out or Path(args.run) / "exports" / args.format)
    written = export_run(Path(args.run), args.format, out)
    print(f"{args.format} export of {args.run}: {len(written)} file(s) in {out}")
    for path in written if len(written) <= 12 else []:
        print(f"  {path.relative_to(out)}")
    return 0


def cmd_evaluate(args) -> int:
    from personalize.errors import ConfigError
    from personalize.evaluation import evaluate_run
    from personalize.report import write_comparison
    from personalize.run_folder import DONE, find_finished
    from personalize.run_settings import EvaluationSpec
    from personalize.scoring import Scorers

    runs = find_finished(args.runs)
    if not runs:
        raise ConfigError("command line", [f"no finished runs (folders with {DONE}) in {args.runs}"])
    fields = {k: v for k, v in {
        "prompts": args.prompts, "samples": args.samples, "seed": args.seed, "scheduler": args.scheduler,
        "steps": args.steps, "guidance_scale": args.guidance, "text_mode": args.text_mode,
        "exclude_tags": args.exclude_tags, "clip": args.clip, "dino": args.dino, "tto": args.tto}.items() if v is not None}
    settings = EvaluationSpec(**fields)
    from personalize.devices import resolve_device

    device = resolve_device(args.device)
    scorers = Scorers(settings.clip, settings.dino, str(device))
    evaluations = []
    for run in runs:
        result = evaluate_run(run, settings, scorers, device=args.device)
        m = result.metrics
        print(f"{m['concept']:>16} {m['method']:<18} CLIP-T {m['clip_t']:.4f}  CLIP-I {m['clip_i']:.4f}  "
              f"DINO {m['dino']:.4f}  identity (0 floor, 1 ceiling) CLIP-I {m.get('clip_i_norm', float('nan')):.2f} "
              f"DINO {m.get('dino_norm', float('nan')):.2f}  ({m['n_images']} images, {m['scale']})  {result.folder / 'report.html'}")
        evaluations.append(result)
    if len(evaluations) > 1:
        out = write_comparison(evaluations, Path(args.out))
        print(f"comparison: {out['html']} (table {out['markdown']}, scatter {out['scatter']})")
    return 0


def build_parser(commands: Commands | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="personalize", description="Staged text-to-image personalization.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, (help_text, run) in (commands or {}).items():  # they parse their own arguments, --help included
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda args, run=run: run(args.rest))

    p = sub.add_parser("tiny-model", help="write a tiny random Stable Diffusion pipeline (diffusers format)")
    p.add_argument("directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", choices=["sd15", "sd21", "sdxl"], default="sd15",
                   help="sd21: SD 2.x's layout (heads per block, linear projections, '!' padding, v-prediction); "
                        "sdxl: SDXL's (two text encoders, pooled text and time ids, no attention in the first level)")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("methods", help="print every method's stage table")
    p.add_argument("--model", help="a model folder: show the numbers scaled to it (its recipe_scale.json)")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("train", help="train every concept of an experiment file in this process")
    p.add_argument("config", help="experiment YAML")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.identity.steps=200 seed=3")
    p.add_argument("--resume", action="store_true", help="continue runs that stopped part-way")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate from a finished run (text-to-image, img2img or inpainting), optionally "
                                      "after test-time optimisation")
    p.add_argument("run", help="a run folder (<output_dir>/<concept>/<method>)")
    p.add_argument("--prompt", action="append", required=True, help="'{}' marks the subject; repeat for several")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", choices=["ddim", "dpm"], default="dpm")
    p.add_argument("--image", default=None, help="start from this photo (img2img): the subject put into it")
    p.add_argument("--mask", default=None, help="with --image: repaint only the mask's white part (inpainting)")
    p.add_argument("--strength", type=float, default=None,
                   help="with --image: how much is repainted, 0-1 (default 0.75; 1 ignores the photo under the mask)")
    p.add_argument("--tto", action="store_true", help="CoRe test-time optimisation of the placeholder for each prompt")
    p.add_argument("--tto-steps", type=int, default=None, help="default: the method's (CoRe: 10)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="default: RUN/generated")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export", help="write a finished run in another tool's format (diffusers, kohya, a1111, pipeline)")
    p.add_argument("run", help="a finished run folder (<output_dir>/<concept>/<method>)")
    p.add_argument("--format", required=True, choices=["diffusers", "kohya", "a1111", "pipeline"],
                   help="diffusers: embeddings, LoRA, Custom Diffusion processors and LOADING.md; kohya: LoRA + embeddings "
                        "for A1111 / Forge / ComfyUI; a1111: embeddings; pipeline: a whole merged diffusers pipeline")
    p.add_argument("--out", default=None, help="a new folder (default RUN/exports/FORMAT)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="sample prompt sets from finished runs, score CLIP-T / CLIP-I / DINO, write reports")
    p.add_argument("runs", nargs="+", help="run folders, or folders holding runs")
    p.add_argument("--prompts", default=None, help="prompt set (default: dreambooth, object or live by concept kind)")
    p.add_argument("--samples", type=int, default=None, help="images per prompt (default 4)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--scheduler", choices=["ddim", "dpm"], default=None, help="default: the method's paper protocol")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--text-mode", choices=["remove", "replace"], default=None,
                   help="CLIP-T prompt: placeholder removed (default) or subject replaced by the class word")
    p.add_argument("--exclude-tags", nargs="*", default=None, help="prompt tags left out of CLIP-I/DINO, e.g. style outfit")
    p.add_argument("--tto", action="store_true", default=None,
                   help="CoRe's test-time optimisation of the placeholder for each prompt before sampling it")
    p.add_argument("--clip", default=None, help="open_clip ARCH/TAG or a local folder (default ViT-B-32/openai)")
    p.add_argument("--dino", default=None, help="transformers ViT id or local folder (default facebook/dino-vits16)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="evaluation", help="folder for the comparison of several runs")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("draw-concepts", help="draw synthetic concepts (photos + concepts.yaml) to try the tools")
    p.add_argument("directory")
    p.add_argument("--photos", type=int, default=5)
    p.add_argument("--size", type=int, default=128)
    p.set_defaults(func=cmd_draw_concepts)

    return parser


def main(argv: list[str] | None = None, commands: Commands | None = None) -> int:
    """The science subcommands, plus `commands` (name -> (help, run(argv))) that a layer above adds: the command
    line's Ray subcommands come from cluster/cli.py, so that this package imports nothing above it."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in (commands or {}):
        return commands[argv[0]][1](argv[1:])
    args = build_parser(commands).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for ours in ("personalize", "pipelines", "tuning"):
        logging.getLogger(ours).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    for noisy in ("httpx", "urllib3", "diffusers", "transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_libraries()
    try:
        load_plugins()
        return args.func(args)
    except PersonalizeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
