"""``ctsr``: upscale images, serve, manage checkpoints, train and evaluate from the command line.

Every failure a user can cause (bad input, bad checkpoint, bad option) ends as one line on
stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import cli_training
from .contract import alpha_label

EXIT_ERROR, EXIT_INTERRUPT = 1, 130


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:  # rejects NaN too
        raise argparse.ArgumentTypeError(f"alpha must be in [0, 1], got {text}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    from models.defaults import COLOR_FIXES, DEFAULT_COLOR_FIX, DEFAULT_OVERLAP, DEFAULT_TILE

    parser = argparse.ArgumentParser(prog="ctsr", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("upscale", help="upscale images or folders of images")
    up.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files or folders")
    up.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR")
    up.add_argument("--model", type=Path, help="checkpoint folder or bundled name: rrdb (default), compact (fast)")
    up.add_argument(
        "--alpha", type=_alpha, action="append", metavar="A",
        help="0 = realness end, 1 = fidelity end (default 0.5); repeat for a sweep",
    )  # fmt: skip
    up.add_argument("--tile", type=_non_negative, default=DEFAULT_TILE, help="LR tile edge; 0 = whole image")
    up.add_argument(
        "--overlap", type=_non_negative, help=f"LR pixels tiles share (default min({DEFAULT_OVERLAP}, tile/4))"
    )
    up.add_argument("--batch", type=_positive, default=4, help="tiles per forward pass")
    up.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    up.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    up.add_argument("--color-fix", default=DEFAULT_COLOR_FIX, choices=list(COLOR_FIXES))
    up.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, fast run)")
    up.add_argument("--base", type=Path, help="sd21: local diffusers SD-2.1-base folder (overrides config)")
    up.add_argument("--max-pixels", type=_positive, default=64_000_000, help="refuse larger inputs")
    up.add_argument("--overwrite", action="store_true", help="replace existing output files")
    up.set_defaults(handler=cmd_upscale)

    model = sub.add_parser("model", help="create and inspect checkpoints")
    msub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    init = msub.add_parser("init", help="write a freshly initialised checkpoint")
    init.add_argument("output", type=Path, metavar="OUT")
    init.add_argument("--arch", required=True, choices=["compact", "sd21"])
    init.add_argument("--preset", help="a name from models/configs or a JSON file (default per arch)")
    init.add_argument("--base", type=Path, help="sd21: local diffusers SD-2.1-base folder to build on")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--overwrite", action="store_true")
    init.set_defaults(handler=cmd_model_init)
    info = msub.add_parser("info", help="print a checkpoint's config and parameter counts")
    info.add_argument("path", type=Path, metavar="CHECKPOINT")
    info.set_defaults(handler=cmd_model_info)
    cli_training.add_calibrate_parser(msub, _positive)
    for name, help_ in (
        ("serve", "the whole stack: embedded Redis (unless CTSR_REDIS_URL), one worker, the gateway"),
        ("gateway", "the HTTP gateway only (needs CTSR_REDIS_URL)"),
        ("worker", "one batching worker on one device (needs CTSR_REDIS_URL)"),
    ):
        cmd = sub.add_parser(name, help=help_, description=f"{help_}. Settings: CTSR_* environment variables.")
        if name == "serve":
            cmd.add_argument(
                "--state-dir", type=Path, default=None,
                help="embedded Redis data, kept between runs (default CTSR_STATE_DIR or ~/.local/state/ctsr)",
            )  # fmt: skip
        if name != "worker":
            cmd.add_argument("--host", default=None, help="bind address (default CTSR_HOST or 127.0.0.1)")
            cmd.add_argument("--port", type=int, default=None, help="port (default CTSR_PORT or 8000)")
        if name != "gateway":
            cmd.add_argument(
                "--model", type=Path, help="checkpoint folder or rrdb|compact (default CTSR_MODEL, else rrdb)"
            )
        cmd.set_defaults(handler=cmd_service)
    key = sub.add_parser("key", help="API keys for the gateway")
    ksub = key.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    knew = ksub.add_parser("new", help="make a key: prints it once, and the hash that goes in CTSR_API_KEYS")
    knew.add_argument("name", help="who the key is for (owns the jobs made with it)")
    knew.set_defaults(handler=cmd_key_new)
    cli_training.add_parsers(sub, _positive, _alpha)
    return parser


def cmd_key_new(args: argparse.Namespace) -> int:
    from service.access import hash_key, new_key

    key = new_key()
    print(f"key (give it to {args.name}; it is not stored anywhere): {key}")
    print(f"CTSR_API_KEYS entry: {json.dumps({args.name: hash_key(key)})}")
    return 0


def cmd_service(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from models.errors import ConfigError

    from . import serving
    from .settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        raise ConfigError(f"invalid CTSR_* setting: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}") from None
    if getattr(args, "model", None):
        settings.model = args.model
    if args.command == "worker":
        return serving.run_worker(settings)
    host = args.host or settings.host
    port = args.port or settings.port
    if args.command == "gateway":
        return serving.run_gateway(settings, host, port)
    return serving.serve(settings, host, port, args.state_dir)


def _plan_outputs(files: list[Path], alphas: Sequence[float], outdir: Path, overwrite: bool) -> list[list[Path]]:
    from models.errors import ConfigError

    labels = [alpha_label(a) for a in alphas]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"alphas {', '.join(map(str, alphas))} repeat once rounded to 3 decimals")
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise ConfigError(f"{f} and {stems[f.stem]} would write the same outputs (same file name stem)")
        stems[f.stem] = f
    plan = [[outdir / f"{f.stem}_a{label}.png" for label in labels] for f in files]
    existing = [p for paths in plan for p in paths if p.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise ConfigError(f"{existing[0]} exists{more}; pass --overwrite to replace")
    return plan


def _chunks(files: list[Path], tiles: list[int], batch: int) -> list[list[int]]:
    """Group consecutive files so small images share tile batches (and memory stays bounded)."""
    chunks: list[list[int]] = [[]]
    count = 0
    for i, n in enumerate(tiles):
        if chunks[-1] and count + n > batch:
            chunks.append([])
            count = 0
        chunks[-1].append(i)
        count += n
    return chunks


def cmd_upscale(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from models import load_student
    from models.defaults import DEFAULT_ALPHA
    from models.errors import ConfigError
    from models.imaging import list_images, load_image, probe_image
    from models.pipeline import TileRunner, UpscaleJob, Upscaler, finish_images
    from models.presets import resolve_model

    alphas = tuple(args.alpha or (DEFAULT_ALPHA,))
    if args.output.exists() and not args.output.is_dir():
        raise ConfigError(f"{args.output} exists and is not a folder")
    files = list_images(args.inputs)
    plan = _plan_outputs(files, alphas, args.output, args.overwrite)
    sizes = [probe_image(f, args.max_pixels) for f in files]  # fail before loading the model
    options = {"base_model": args.base} if args.base else {}
    student = load_student(resolve_model(args.model), **options)
    runner = TileRunner(student, args.device, args.dtype, compile=args.compile)
    upscaler = Upscaler(runner, tile=args.tile, overlap=args.overlap, max_batch=args.batch)
    tiles = [len(upscaler.grid(h, w)) for w, h in sizes]
    args.output.mkdir(parents=True, exist_ok=True)

    with tqdm(total=sum(tiles), unit="tile", desc="upscaling", disable=None) as bar:
        for chunk in _chunks(files, tiles, args.batch):
            images = [load_image(files[i], max_pixels=args.max_pixels) for i in chunk]
            for i, image in zip(chunk, images, strict=True):
                for note in image.notes:
                    bar.write(f"{files[i].name}: {note}")
            jobs = [UpscaleJob(image.rgb, alphas, args.color_fix) for image in images]
            for i, image, result in zip(chunk, images, upscaler.run(jobs, progress=bar.update), strict=True):
                for pil, out in zip(finish_images(image, result), plan[i], strict=True):
                    pil.save(out)
    print(f"wrote {sum(len(p) for p in plan)} image(s) to {args.output}")
    return 0


def cmd_model_init(args: argparse.Namespace) -> int:
    import torch

    from models import build_student, save_student
    from models.errors import ConfigError
    from models.presets import DEFAULT_PRESET, load_preset

    if args.output.exists() and not args.output.is_dir():
        raise ConfigError(f"{args.output} exists and is not a folder")
    if args.output.exists() and any(args.output.iterdir()) and not args.overwrite:
        raise ConfigError(f"{args.output} exists and is not empty; pass --overwrite")
    config = load_preset(args.preset or DEFAULT_PRESET[args.arch])
    if config.family != args.arch:
        raise ConfigError(f"preset {args.preset} is for {config.family}, not {args.arch}")
    options = {}
    if args.base is not None:
        if args.arch != "sd21":
            raise ConfigError("--base only applies to --arch sd21")
        options["base_model"] = args.base.resolve()
    torch.manual_seed(args.seed)
    student = build_student(config, **options)
    provenance = {"init": "random", "seed": args.seed, "preset": args.preset or DEFAULT_PRESET[args.arch]}
    path = save_student(student, args.output, provenance)
    print(f"wrote a freshly initialised {config.family} x{config.scale} checkpoint to {path}")
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    from models import load_student

    student = load_student(args.path)
    total = sum(p.numel() for p in student.parameters())
    files = student.state_files()
    stored = sum(t.numel() for tensors in files.values() for t in tensors.values())
    info = {**student.config.to_dict(), "parameters": total, "stored_tensors": stored, "files": sorted(files)}
    print(json.dumps(info, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from models.errors import CTSRError

    handler: Callable[[argparse.Namespace], int] = args.handler  # every subcommand sets one (cmd_*)
    try:
        return handler(args)
    except CTSRError as exc:
        print(f"ctsr: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # `ctsr model info X | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("ctsr: interrupted", file=sys.stderr)
        return EXIT_INTERRUPT


if __name__ == "__main__":
    sys.exit(main())
