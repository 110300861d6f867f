"""Command line: `thinkdiff <command> --config PRESET_OR_YAML [section.key=value ...]`.

    thinkdiff corpus --config tiny              # download the url list (tiny: the loopback demo)
    thinkdiff features --config tiny            # caption + cache VLM states (resumable)
    thinkdiff train --config tiny               # train the aligner (resumes from the newest checkpoint)
    thinkdiff config --config paper-lvlm        # print the resolved, validated config
    thinkdiff registry register --config tiny   # log the finished run to MLflow, register the aligner
    thinkdiff registry promote --config tiny --version candidate
    thinkdiff cobsat prompts --task 1 --shot 2 --limit 5
    thinkdiff cobsat eval --config tiny eval.generator=copy-last
    thinkdiff compose --config tiny-clip --image a.jpg --image b.jpg --text "on a beach" --out out.png
    thinkdiff aligner import-official IN.pth OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from thinkdiff.errors import BAD_INPUT_ERRORS
from thinkdiff.storage import atomic_write_image

if TYPE_CHECKING:
    from thinkdiff.config import RunConfig

log = logging.getLogger("thinkdiff")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", required=True, help="preset name in conf/ (tiny, paper-lvlm) or a YAML path")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=2e-4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thinkdiff",
                                     description="ThinkDiff: align VLM token features to a T5 decoder / FLUX.")
    parser.add_argument("--quiet", "-q", action="store_true", help="log warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="print the resolved, validated config as YAML")
    _add_config_args(p)

    p = sub.add_parser("corpus", help="download the url list (or the loopback demo) with img2dataset")
    _add_config_args(p)

    p = sub.add_parser("features", help="caption images with the VLM and cache generated-token states to Parquet")
    _add_config_args(p)
    p.add_argument("--corpus", type=Path,
                   help="img2dataset parquet output dir (default: the config's corpus stage dir)")
    p.add_argument("--out", type=Path, help="feature store dir (default: {paths.root}/features/{fingerprint})")

    p = sub.add_parser("train", help="train the aligner in this process (resumes from the newest checkpoint)")
    _add_config_args(p)
    p.add_argument("--features", type=Path, help="feature store dir (default: the config's features stage dir)")
    p.add_argument("--out", type=Path, help="run dir (default: {paths.root}/train/{fingerprint})")
    p.add_argument("--wait", action="store_true",
                   help="while another training writes the run dir, wait for it (default: refuse at once)")

    p = sub.add_parser("registry", help="MLflow: log + register a finished training run, promote a version")
    registry_sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = registry_sub.add_parser("register",
                                help="log the config's finished training run and register its aligner (idempotent)")
    _add_config_args(q)
    q.add_argument("--run", type=Path, help="training run dir, the first line `thinkdiff train` prints (default: the "
                                            "config's own; a run trained with --features or --out has another)")
    q = registry_sub.add_parser("promote", help="point the `champion` alias at a version")
    _add_config_args(q)
    q.add_argument("--version", required=True, help="a version number or an alias (e.g. candidate)")
    q.add_argument("--reason", default="manual promotion", help="recorded on the version")

    p = sub.add_parser("cobsat", help="CoBSAT benchmark: prompts, synthetic set, evaluation")
    cobsat_sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = cobsat_sub.add_parser("prompts", help="print the official prompts of one task and shot as JSON lines")
    q.add_argument("--task", required=True, help="1..10, a name (Color-I) or a short name (C-I)")
    q.add_argument("--shot", type=int, required=True, help="number of demos (papers: 2 and 4)")
    q.add_argument("--limit", type=int, help="only the first K prompts (default: all 1000)")
    q = cobsat_sub.add_parser("make-synthetic", help="write the synthetic CoBSAT-format set into a directory")
    q.add_argument("output", type=Path)
    q.add_argument("--size", type=int, default=96, help="image side in pixels")
    q = cobsat_sub.add_parser("eval", help="generate -> judge -> results.jsonl, summary table and charts (resumable)")
    _add_config_args(q)
    q.add_argument("--model", help="aligner to evaluate: models:/name@alias, models:/name/N, a dir or a .pth "
                                   "(default: eval.aligner, else this config's own trained aligner)")
    q.add_argument("--nightly", action="store_true",
                   help="evaluate @champion (and a newer @candidate), promote the better")

    p = sub.add_parser("generate", help="interleaved images and text -> VLM -> aligner -> FLUX image")
    _add_config_args(p)
    p.add_argument("--text", dest="parts", action="append", type=lambda v: ("text", v), help="a text part (repeatable)")
    p.add_argument("--image", dest="parts", action="append", type=lambda v: ("image", v),
                   help="an image part (repeatable)")
    p.add_argument("--aligner", help="models:/name@alias, a directory or an official .pth "
                                     "(default: eval.aligner, then this config's own)")
    p.add_argument("--out", type=Path, required=True, help="the image to write (.png or .jpg; never overwritten)")

    p = sub.add_parser("compose", help="ThinkDiff-CLIP: any number of images and an optional text -> one FLUX image")
    _add_config_args(p)
    p.add_argument("--image", dest="images", action="append", type=Path, required=True,
                   help="an input image (repeatable)")
    p.add_argument("--text", help="optional text, embedded by FLUX's own T5 after the image tokens")
    p.add_argument("--aligner",
                   help="models:/name@alias or a directory (default: eval.aligner, then this config's own)")
    p.add_argument("--out", type=Path, required=True,
                   help="the image to write (.png or .jpg; never overwritten); "
                        "a side-by-side sheet goes next to it (.sheet.png)")

    p = sub.add_parser("aligner", help="aligner checkpoint tools")
    aligner_sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = aligner_sub.add_parser("import-official",
                               help="convert the released .pth aligner to config.json + model.safetensors")
    q.add_argument("input", type=Path, help="the official checkpoint (.pth, a dict with key 'model')")
    q.add_argument("output", type=Path, help="new directory to write (must not exist)")
    return parser


def parse_command_line(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed command; overrides may also follow the options (`... --corpus DIR train.lr=1e-4`),
    where argparse alone would stop taking positionals."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides")
                  or not all(re.fullmatch(r"[A-Za-z_][\w.]*=.*", a, re.S) for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_command_line(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return HANDLERS[args.command, getattr(args, "action", None)](args)
    except BAD_INPUT_ERRORS as err:
        print(f"thinkdiff {args.command}: error: {err}", file=sys.stderr)
        return 2


def _open_image(path: str | Path) -> Image.Image:
    """An --image argument as RGB, or an error that names it (read before any model loads)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"--image {path}: no such file") from None
    except (Image.UnidentifiedImageError, OSError) as err:
        raise ValueError(f"--image {path}: not an image Pillow can read ({err}); "
                         "give a JPEG, PNG or WebP file") from None


def _check_new_outputs(out: Path, *more: Path) -> None:
    """An image output is never overwritten, and its type must be known: both checked before any
    model loads."""
    for path in (out, *more):
        if path.exists():
            raise FileExistsError(f"{path} exists; an output is never overwritten: choose another --out or delete it")
    if out.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {out}: unknown image type {out.suffix!r}; end the name in .png or .jpg")


# Each handler checks its arguments and the config before its heavy imports (torch, transformers),
# so --help, `config` and a mistyped override answer at once.


def _load_config(args: argparse.Namespace) -> RunConfig:
    from thinkdiff.config import load_config

    return load_config(args.config, args.overrides)


def _config(args: argparse.Namespace) -> int:
    print(_load_config(args).to_yaml(), end="")
    return 0


def _corpus(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    from thinkdiff import pipeline

    print(pipeline.build_corpus(cfg).path)
    return 0


def _features(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    from thinkdiff import pipeline

    print(pipeline.cache_features(cfg, corpus_dir=args.corpus, out_dir=args.out))
    return 0


def _train(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    from thinkdiff import pipeline

    result = pipeline.train_aligner(cfg, args.features, args.out, wait=args.wait)
    print(f"{result.run_dir}\n{result.aligner_dir}")
    return 0


def _registry_register(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    from thinkdiff import pipeline

    print(pipeline.register_aligner(cfg, args.run).uri)
    return 0


def _registry_promote(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    from thinkdiff import pipeline

    print(pipeline.promote_aligner(cfg, args.version, args.reason).uri)
    return 0


def _cobsat_prompts(args: argparse.Namespace) -> int:
    from thinkdiff.eval.cobsat import build_prompts, get_task

    for prompt in build_prompts(get_task(args.task), args.shot, args.limit):
        print(json.dumps(prompt.to_json()))
    return 0


def _cobsat_make_synthetic(args: argparse.Namespace) -> int:
    from thinkdiff.eval.dataset import make_synthetic_dataset

    print(make_synthetic_dataset(args.output, args.size).root)
    return 0


def _cobsat_eval(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    from thinkdiff.eval import stage

    if args.nightly:
        print(json.dumps(stage.evaluate_cobsat_nightly(cfg).report()))
        return 0
    result = stage.evaluate_cobsat(cfg, model=args.model)
    print(result.table)
    if result.skipped:
        return 0
    charts = ", ".join(path.name for path in (result.comparison_png, result.accuracy_png) if path is not None)
    print(f"results: {result.results_dir} ({charts}, {result.samples_png.name}, {result.summary_json.name}); "
          f"MLflow run {result.run_id}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    if not args.parts:
        raise ValueError("give the prompt as --text and --image parts, in order")
    # Input images are read before any model loads: a wrong path fails at once.
    parts = [_open_image(value) if kind == "image" else value for kind, value in args.parts]
    _check_new_outputs(args.out)
    from thinkdiff import pipeline
    from thinkdiff.generate import build_generator

    generator = build_generator(cfg, pipeline.aligner_spec(cfg, args.aligner))
    (drawing,) = generator.draw([parts], vlm_seed=cfg.eval.seed, flux_seeds=[cfg.eval.seed])
    atomic_write_image(args.out, drawing.image)
    print(args.out)
    return 0


def _compose(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    inputs = [_open_image(path) for path in args.images]
    sheet_path = args.out.with_suffix(".sheet.png")
    _check_new_outputs(args.out, sheet_path)
    from thinkdiff import pipeline
    from thinkdiff.generate import build_composer
    from thinkdiff.plots import save_sample_grid

    composer = build_composer(cfg, pipeline.aligner_spec(cfg, args.aligner))
    image = composer.compose(inputs, args.text, seed=cfg.eval.seed)
    atomic_write_image(args.out, image)
    sheet = save_sample_grid([(inputs + [image], f"{' + '.join(p.name for p in args.images)} + {args.text or ''!r}")],
                             sheet_path)
    print(f"{args.out}\n{sheet}")
    return 0


def _aligner_import_official(args: argparse.Namespace) -> int:
    from thinkdiff.models.aligner import import_official_checkpoint

    print(import_official_checkpoint(args.input, args.output))
    return 0


# (command, action) -> handler; the action is None for a command without actions.
HANDLERS: dict[tuple[str, str | None], Callable[[argparse.Namespace], int]] = {
    ("config", None): _config,
    ("corpus", None): _corpus,
    ("features", None): _features,
    ("train", None): _train,
    ("registry", "register"): _registry_register,
    ("registry", "promote"): _registry_promote,
    ("cobsat", "prompts"): _cobsat_prompts,
    ("cobsat", "make-synthetic"): _cobsat_make_synthetic,
    ("cobsat", "eval"): _cobsat_eval,
    ("generate", None): _generate,
    ("compose", None): _compose,
    ("aligner", "import-official"): _aligner_import_official,
}


if __name__ == "__main__":
    sys.exit(main())
