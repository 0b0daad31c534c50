"""Training the character language models with `train.fit`: their tasks, and train/resume/evaluate.

`MLMTask` and `LMTask` share `WindowTask`: a text cut into windows (random offsets and order per
epoch, from (seed, epoch)), validation on the last tenth in order, sums over each rank's share. They
differ in their batches (masked inputs and labels; windows one longer for next-character targets),
their loss and their metrics (masked-character accuracy; nats and bits per character).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import checkpoints, runs
from .data.text import DataError, load_corpus, read_text_file
from .data.tokenizer import CharTokenizer
from .data.windows import WindowSampler, split_train_val, windows
from .text import (IGNORE_INDEX, SPECIAL_TOKENS, LanguageModel, TextConfig, config_class, generate, lm_loss,
                   mask_tokens, mlm_loss_of)
from .train import TrainConfig, fit, is_terminal, resolve_device, resumed_configs, shard_sums, steps_for_epochs


@dataclass(frozen=True)
class TextSource:
    """Where the text comes from: a named corpus or a file."""

    corpus: str = "shakespeare"
    text_file: str | None = None

    def read(self) -> str:
        return read_text_file(self.text_file) if self.text_file else load_corpus(self.corpus)

    def absolute(self) -> "TextSource":
        """The same source with the file's path made absolute, so a run resumes from any directory."""
        return dataclasses.replace(self, text_file=os.path.abspath(self.text_file)) if self.text_file else self

    def describe(self) -> str:
        return repr(self.text_file) if self.text_file else f"corpus {self.corpus!r}"


# --- tasks -----------------------------------------------------------------------------------------------

class WindowTask:
    """What the text tasks share: training windows, validation windows, epochs and validation sums.

    ``train_ids`` may be None for a task that only evaluates (`evaluate`).
    """

    name: str
    extra = 0  # training windows are seq_len + extra long

    def __init__(self, train_ids: Tensor | None, val_ids: Tensor, tokenizer: CharTokenizer, seq_len: int,
                 batch_size: int, seed: int, device: torch.device, eval_batch_size: int = 256,
                 max_val_windows: int | None = None):
        self.sampler = None if train_ids is None else WindowSampler(train_ids, seq_len, batch_size, seed, self.extra)
        self.val = windows(val_ids, seq_len + self.extra, 0, seq_len)[:max_val_windows]
        if len(self.val) == 0:
            raise DataError(f"the validation text ({len(val_ids)} characters) is shorter than one window of "
                            f"{seq_len + self.extra}; use a longer text or a smaller --seq-len")
        self.tok, self.seq_len, self.device, self.eval_batch_size = tokenizer, seq_len, device, eval_batch_size

    def epoch(self, step: int) -> float:
        return step / self.sampler.per_epoch

    def describe(self) -> str:
        return (f"{len(self.sampler.ids):,} training characters, {len(self.val):,} validation windows of "
                f"{self.seq_len}, vocabulary {self.tok.vocab_size}")

    def evaluate_sums(self, model: nn.Module, rank: int = 0, world: int = 1) -> dict[str, float]:
        """Summed loss and counts over this rank's share of the validation batches."""
        return shard_sums(self.val.split(self.eval_batch_size), rank, world,
                          lambda i, chunk: self.measure(model, i, chunk.to(self.device)))

    def measure(self, model: nn.Module, i: int, chunk: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(mean loss, correct, count) of validation batch ``i``."""
        raise NotImplementedError


class MLMTask(WindowTask):
    """Masked-LM batches, loss, validation (fixed masking seeds) and sample fills."""

    name = "mlm"
    best_metric = ("val_accuracy", True)

    def __init__(self, *args, color: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.color = color

    def _mask(self, ids: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return mask_tokens(ids, mask_id=self.tok.mask_id, vocab_size=self.tok.vocab_size,
                           special_ids=self.tok.special_ids, generator=generator)

    def batch(self, step: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(inputs, labels) of the whole global batch, masked before any rank takes its shard."""
        return self._mask(self.sampler.batch(step).to(self.device, non_blocking=True), generator)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor], generator: torch.Generator):
        inputs, labels = batch
        loss, correct, count = mlm_loss_of(model, inputs, labels)
        return loss, {"correct": correct, "count": count}

    def tokens_per_batch(self, batch: tuple[Tensor, Tensor]) -> int:
        return batch[0].numel()

    def measure(self, model: nn.Module, i: int, chunk: Tensor):
        # each validation batch is masked from its own fixed seed: the same masks at every evaluation,
        # whatever the number of ranks
        generator = torch.Generator(device=self.device).manual_seed(1234 + i)
        inputs, labels = self._mask(chunk, generator)
        return mlm_loss_of(model, inputs, labels)

    @staticmethod
    def summarise(sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["count"], 1.0)
        return {"val_loss": sums["loss"] / n, "val_accuracy": sums["correct"] / n}

    def sample_windows(self) -> list[Tensor]:
        """The seed's prompts where the vocabulary has their characters, else the first validation windows."""
        prompts = [p[: self.seq_len] for p in SAMPLE_PROMPTS if set(p) <= self.tok.stoi.keys()]
        if prompts:
            return [self.tok.encode(p) for p in prompts]
        return list(self.val[: len(SAMPLE_PROMPTS)])

    def report(self, model: nn.Module, step: int) -> str:
        generator = torch.Generator(device=self.device).manual_seed(4321)
        lines = []
        for ids in self.sample_windows():
            ids = ids.to(self.device)[None]
            inputs, labels = self._mask(ids, generator)
            predicted = model(inputs).argmax(-1)[0]
            lines.append(render_fill(self.tok, inputs[0], labels[0], predicted, self.color))
        return "\n".join(lines)


class LMTask(WindowTask):
    """Next-character batches, loss, validation (nats and bits per character) and a sample."""

    name = "lm"
    best_metric = ("val_loss", False)
    extra = 1

    def __init__(self, *args, prompt: str = "ROMEO:", **kwargs):
        super().__init__(*args, **kwargs)
        self.prompt = prompt if set(prompt) <= self.tok.stoi.keys() else self.tok.decode(self.val[0][:8])

    def batch(self, step: int, generator: torch.Generator) -> Tensor:
        return self.sampler.batch(step).to(self.device, non_blocking=True)  # (B, seq_len + 1)

    def loss(self, model: nn.Module, batch: Tensor, generator: torch.Generator):
        loss, correct, count = lm_loss(model(batch[:, :-1]), batch[:, 1:])
        return loss, {"correct": correct, "count": count}

    def tokens_per_batch(self, batch: Tensor) -> int:
        return batch.shape[0] * (batch.shape[1] - 1)

    def measure(self, model: nn.Module, i: int, chunk: Tensor):
        return lm_loss(model(chunk[:, :-1]), chunk[:, 1:])

    @staticmethod
    def summarise(sums: dict[str, float]) -> dict[str, float]:
        nats = sums["loss"] / max(sums["count"], 1.0)
        return {"val_loss": nats, "val_bpc": nats / math.log(2), "val_accuracy": sums["correct"] / max(sums["count"], 1.0)}

    def report(self, model: nn.Module, step: int) -> str:
        text = "".join(generate(model, self.tok, self.prompt, max_new_chars=120, temperature=0.8, seed=0))
        return self.prompt + text


TASKS = {"mlm": MLMTask, "lm": LMTask}


SAMPLE_PROMPTS = (  # the seed experiment's prompts (Coriolanus, I.1)
    "We are accounted poor citizens, the patricians good.",
    "What authority surfeits on would relieve us: if they",
    "would yield us but the superfluity, while it were",
    "wholesome, we might guess they relieved us humanely;",
)


GREEN, RED, DIM, RESET = "\033[32m", "\033[31m", "\033[2m", "\033[0m"


def render_fill(tok, inputs: Tensor, labels: Tensor, predicted: Tensor, color: bool) -> str:
    """The text with predictions at chosen positions: green right, red wrong (or a marker line)."""
    text, marks = [], []
    for x, y, p in zip(inputs.tolist(), labels.tolist(), predicted.tolist()):
        if y == IGNORE_INDEX:
            ch = tok.itos[x] if x >= SPECIAL_TOKENS else "?"
            text.append(f"{DIM}{ch}{RESET}" if color else ch)
            marks.append(" ")
        else:
            ch = tok.itos[p] if p >= SPECIAL_TOKENS else "*"
            text.append(f"{GREEN if p == y else RED}{ch}{RESET}" if color else ch)
            marks.append("^" if p == y else "x")
    line = "".join(text).replace("\n", "⏎")
    return line if color else f"{line}\n{''.join(marks)}"


# --- train, resume ---------------------------------------------------------------------------------------

def text_config(task: str, model_fields: dict, text: str) -> tuple[CharTokenizer, TextConfig]:
    """The tokenizer of ``text`` and the model config of ``task`` with ``model_fields`` set."""
    tok = CharTokenizer.from_text(text)
    if task == "lm":  # the causal token MLP is square: its hidden width follows seq_len unless given
        model_fields = {"tokens_mlp_dim": model_fields.get("seq_len", 32), **model_fields}
    return tok, config_class(task)(vocab_size=tok.vocab_size, **model_fields)


def train_text(task: str, model_fields: dict, train: TrainConfig, source: TextSource, out: str | os.PathLike, *,
               overwrite: bool = False, max_val_windows: int | None = None, quiet: bool = False,
               epochs: float | None = None, tensorboard: bool = False) -> dict[str, float]:
    """Train a character-level model (``task`` "mlm" or "lm"); returns the final validation metrics.

    ``epochs``, when given, replaces ``train.steps`` by the number of steps in that many epochs.
    """
    out = Path(out)
    text = source.read()
    tok, config = text_config(task, model_fields, text)
    if epochs is not None:
        per_epoch = len(split_train_val(text)[0]) // (config.seq_len * train.batch_size)
        train = steps_for_epochs(train, epochs, per_epoch)
    with runs.new_run(out, overwrite):
        return _run(config, train, tok, text, out, resume=False, source=source.absolute(),
                    fingerprint=runs.fingerprint_text(text),
                    max_val_windows=max_val_windows, quiet=quiet, tensorboard=tensorboard)


def train_mlm(model_fields: dict, train: TrainConfig, source: TextSource, out: str | os.PathLike,
              **options) -> dict[str, float]:
    """Train a character-level masked LM (see `train_text`)."""
    return train_text("mlm", model_fields, train, source, out, **options)


def resume_text(task: str, out: str | os.PathLike, *, changes: dict | None = None, quiet: bool = False,
                tensorboard: bool = False, text_file: str | None = None,
                allow_changed_data: bool = False) -> dict[str, float]:
    """Continue the run in ``out`` from its last checkpoint (optionally to a new step count).

    The text is read from the path saved with the run (absolute), or from ``text_file`` when the data
    moved; either way its fingerprint must match the one saved unless ``allow_changed_data``.
    """
    out = Path(out)
    with runs.open_run(out):
        saved, train = resumed_configs(out, task, changes or {})
        config = runs.build_config(config_class(task), saved["model"], out / checkpoints.CONFIG_FILE)
        source, data = saved_source(out, saved)
        if text_file is not None:
            source = TextSource(corpus=source.corpus, text_file=text_file).absolute()
        if not quiet:
            print(f"resuming {out} on {source.describe()}", file=sys.stderr)
        text = source.read()
        fingerprint = runs.fingerprint_text(text)
        runs.check_fingerprint(data.get("fingerprint"), fingerprint, source.describe(), allow_changed_data)
        tok = load_tokenizer(out, config.vocab_size)
        if text_file is not None:
            runs.write_config(out, {**saved, "data": {**dataclasses.asdict(source), "fingerprint": fingerprint}})
        return _run(config, train, tok, text, out, resume=True, source=source, fingerprint=fingerprint,
                    max_val_windows=saved.get("max_val_windows"), quiet=quiet, tensorboard=tensorboard)


def resume_mlm(out: str | os.PathLike, **options) -> dict[str, float]:
    return resume_text("mlm", out, **options)


def saved_source(run: Path, saved: dict) -> tuple[TextSource, dict]:
    """The run's text source and its saved data record (with the fingerprint)."""
    data = saved.get("data") if isinstance(saved.get("data"), dict) else {}
    fields = {k: v for k, v in data.items() if k != "fingerprint"}
    return runs.build_config(TextSource, fields, run / checkpoints.CONFIG_FILE, "data"), data


def load_tokenizer(run: Path, vocab_size: int) -> CharTokenizer:
    """The run's vocabulary, which must be as large as its model's."""
    tok = CharTokenizer.load(run)
    if tok.vocab_size != vocab_size:
        raise checkpoints.CheckpointError(f"{run / runs.VOCAB_FILE} has {tok.vocab_size} tokens but the model "
                                          f"{vocab_size}; the run's files do not belong together")
    return tok


def make_task(config: TextConfig, tok: CharTokenizer, text: str, batch_size: int, seed: int, device: torch.device,
              max_val_windows: int | None, *, train_ids: bool = True):
    """The task of ``config`` on ``text``: the first 90 % to train on (unless ``train_ids`` is off), the rest
    to validate on."""
    ids = tok.encode(text)
    train_part, val_part = split_train_val(ids)
    if train_ids and len(train_part) < (config.seq_len + 1) * batch_size:
        raise DataError(f"the text ({len(text)} characters, {len(train_part)} for training) is shorter than one batch "
                        f"of {batch_size} windows of {config.seq_len}; use a longer text or smaller sizes")
    options = {"color": is_terminal()} if config.task == "mlm" else {}
    return TASKS[config.task](train_part if train_ids else None, val_part, tok, config.seq_len, batch_size, seed,
                              device, max_val_windows=max_val_windows, **options)


def _run(config: TextConfig, train: TrainConfig, tok: CharTokenizer, text: str, out: Path, *, resume: bool,
         source: TextSource, fingerprint: dict, max_val_windows: int | None, quiet: bool,
         tensorboard: bool = False) -> dict[str, float]:
    job = make_task(config, tok, text, train.batch_size, train.seed, resolve_device(train.device), max_val_windows)
    torch.manual_seed(train.seed)
    model = LanguageModel(config)
    run_config = {"task": config.task, "model": dataclasses.asdict(config),
                  "data": {**dataclasses.asdict(source), "fingerprint": fingerprint},
                  "max_val_windows": max_val_windows}
    return fit(model, job, train, out, d_model=config.d_model, run_config=run_config, resume=resume,
               save_extra=tok.save, quiet=quiet, tensorboard=tensorboard)
