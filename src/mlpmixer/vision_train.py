"""Training an MlpMixer image classifier with `train.fit`, and predicting with a trained one.

The recipe is the paper's fine-tuning one, scaled down: AdamW with linear warm-up and cosine decay,
label smoothing, optional mixup, random resized crops; validation top-1 after every epoch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoints, runs
from .data.images import (Augment, ImageData, Preprocess, augment, background_of, image_survey, load_digits,
                          load_image_folder)
from .errors import DataWarning
from .official import checkpoint_grid, load_official_npz
from .resize import resize_tokens
from .data.windows import step_seed
from .recipe import FolderShape, Recipe, choose, epochs_for_budget
from .train import (TrainConfig, fit, resolve_device, resumed_configs, shard_sums, steps_for_epochs,
                    time_step)
from .vision import MlpMixer, VisionConfig, read_vision_config

DATASETS = ("digits",)
IN_MEMORY_BYTES = 2 << 30
"""A folder whose decoded images (uint8, at the training and validation sizes) fit in this many bytes
is decoded once and kept in memory; a larger one is read from its files batch by batch."""


@dataclass(frozen=True, kw_only=True)
class VisionTrainConfig(TrainConfig):
    """How to train an image classifier: TrainConfig with vision defaults, plus the regularisers."""

    steps: int = 660
    """Optimiser steps in the whole run (``--epochs`` sets it from the data)."""
    batch_size: int = 64
    """Images per optimiser step, over all ranks: the global batch (torchrun ranks split it)."""
    optimizer: str = "adamw"
    """``adamw``: linear warm-up then cosine decay to 0; ``noam``: Adam with the inverse-sqrt schedule."""
    lr: float = 2e-3
    """Peak learning rate."""
    warmup: int = 60
    """Warm-up steps."""
    weight_decay: float = 0.05
    """Decoupled weight decay on kernels (not biases or LayerNorms)."""
    eval_every: int = 22
    """Validate every this many steps (``--epochs`` makes it one epoch)."""
    log_every: int = 11
    """Write a training row to metrics.jsonl every this many steps."""
    ckpt_every: int = 220
    """Checkpoint every this many steps (and at the end)."""
    label_smoothing: float = 0.1
    """Weight moved from the true class to a uniform distribution over all classes."""
    mixup_alpha: float = 0.0
    """Mixup: blend image pairs with λ ~ Beta(α, α) (0 = off)."""
    augment: bool = True
    """Random resized crops (and flips, except for digits) of the training images."""
    crop_scale: float | None = None
    """Smallest random crop, as a fraction of the image's area (None: the data's own, 0.08 for folders)."""
    rotate: float = 0.0
    """Largest random rotation of a training image, in degrees."""
    translate: float = 0.0
    """Largest random shift of a training image, as a fraction of its side."""
    hflip: bool | None = None
    """Flip training images left-right (None: the data's own; never for digits)."""
    grad_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: less memory, more time."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.mixup_alpha < 0:
            raise ValueError(f"mixup_alpha must be >= 0, got {self.mixup_alpha}")
        if self.crop_scale is not None and not 0.0 < self.crop_scale <= 1.0:
            raise ValueError(f"crop_scale must be in (0, 1], got {self.crop_scale}")
        if not 0.0 <= self.rotate <= 180.0:
            raise ValueError(f"rotate must be in [0, 180] degrees, got {self.rotate}")
        if not 0.0 <= self.translate < 1.0:
            raise ValueError(f"translate must be in [0, 1), got {self.translate}")

    def augmentation(self, default: Augment) -> Augment:
        """The data's default augmentation with this config's choices applied."""
        scale = default.scale if self.crop_scale is None else (min(self.crop_scale, default.scale[1]), default.scale[1])
        return dataclasses.replace(default, scale=scale, rotate=self.rotate, translate=self.translate,
                                   hflip=default.hflip if self.hflip is None else self.hflip)


class VisionTask:
    """Image batches, smoothed (and mixed) cross-entropy, and validation top-1 for `train.fit`."""

    name = "vision"
    best_metric = ("val_top1", True)

    def __init__(self, data: ImageData, preprocess: Preprocess, config: VisionTrainConfig, num_classes: int,
                 device: torch.device, eval_batch_size: int = 256):
        self.data, self.preprocess, self.config, self.device = data, preprocess, config, device
        self.num_classes, self.eval_batch_size = num_classes, eval_batch_size
        self.per_epoch = len(data.train) // config.batch_size
        if self.per_epoch == 0:
            raise ValueError(f"{len(data.train)} training images are fewer than one batch of {config.batch_size}; "
                             f"use a smaller --batch-size")
        side = [math.ceil(s / preprocess.crop_pct) for s in preprocess.img_size]
        self.train_size = tuple(side) if config.augment else preprocess.img_size
        self.train_crop = 1.0 if config.augment else preprocess.crop_pct
        self.augmentation = config.augmentation(data.augment)
        self.train_images, self.val_images = data.train, data.val
        if data.train.decoded_bytes(preprocess.in_chans, self.train_size) + \
                data.val.decoded_bytes(preprocess.in_chans, preprocess.img_size) <= IN_MEMORY_BYTES:
            self.train_images = data.train.decoded(preprocess, self.train_size, self.train_crop)
            self.val_images = data.val.decoded(preprocess, preprocess.img_size, preprocess.crop_pct)
        self._epoch, self._order = -1, None

    @classmethod
    def for_evaluation(cls, data: ImageData, preprocess: Preprocess, num_classes: int, device: torch.device,
                       eval_batch_size: int = 256) -> "VisionTask":
        """A task that only validates (`evaluate_sums`, `summarise`): no training schedule needed."""
        task = cls.__new__(cls)
        task.data, task.preprocess, task.device = data, preprocess, device
        task.num_classes, task.eval_batch_size = num_classes, eval_batch_size
        task.val_images = data.val
        return task

    def batch(self, step: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        epoch, index = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(step_seed(self.config.seed, epoch))
            self._epoch, self._order = epoch, torch.randperm(len(self.data.train), generator=g)
        rows = self._order[index * self.config.batch_size:(index + 1) * self.config.batch_size]
        x = self.train_images.load(rows, self.preprocess, self.train_size, self.train_crop).to(self.device)
        if self.config.augment:
            x = augment(x, self.preprocess.img_size, self.augmentation, generator)
        return self.preprocess.normalize(x), self.data.train.labels[rows].to(self.device)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor], generator: torch.Generator):
        x, y = batch
        targets = smoothed_targets(y, self.num_classes, self.config.label_smoothing)
        if self.config.mixup_alpha > 0:
            x, targets = mixup(x, targets, self.config.mixup_alpha, generator)
        logits = model(x)
        loss = -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
        return loss, {"correct": (logits.argmax(-1) == y).sum(), "count": len(y)}

    def evaluate_sums(self, model: nn.Module, rank: int = 0, world: int = 1) -> dict[str, float]:
        """Summed loss and correct count over this rank's share of the validation batches."""
        val = self.val_images

        def measure(i: int, rows: Tensor):
            x = val.load(rows, self.preprocess, self.preprocess.img_size, self.preprocess.crop_pct).to(self.device)
            y = val.labels[rows].to(self.device)
            logits = model(self.preprocess.normalize(x)).float()
            top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (B, 5)
            return (F.cross_entropy(logits, y), (logits.argmax(-1) == y).sum(), len(rows),
                    (top5 == y[:, None]).any(-1).sum())

        return shard_sums(torch.arange(len(val)).split(self.eval_batch_size), rank, world, measure)

    @staticmethod
    def summarise(sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["count"], 1.0)
        return {"val_loss": sums["loss"] / n, "val_top1": sums["correct"] / n, "val_top5": sums["correct5"] / n}

    def report(self, model: nn.Module, step: int) -> None:
        return None

    def tokens_per_batch(self, batch: tuple[Tensor, Tensor]) -> int:
        return len(batch[1])

    def describe(self) -> str:
        h, w = self.preprocess.img_size
        return (f"{len(self.data.train):,} training and {len(self.data.val):,} validation images, "
                f"{self.num_classes} classes, {h}x{w}x{self.preprocess.in_chans}")

    def epoch(self, step: int) -> float:
        return step / self.per_epoch


def smoothed_targets(y: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """Labels (B,) -> target distributions (B, num_classes): 1 - ε on the class plus ε / num_classes."""
    return F.one_hot(y, num_classes).float() * (1.0 - smoothing) + smoothing / num_classes


def mixup(x: Tensor, targets: Tensor, alpha: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Blend each image (and its target) with another of the batch: λ·a + (1 - λ)·b, λ ~ Beta(α, α)."""
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator, device=generator.device))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(len(x), generator=generator, device=generator.device).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * targets + (1 - lam) * targets[perm]


def load_data(dataset: str = "digits", data_dir: str | os.PathLike | None = None, in_chans: int = 3) -> ImageData:
    if data_dir is not None:
        return load_image_folder(data_dir, in_chans)
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)} or give --data-dir")
    return load_digits()


AUTO = "auto"
"""``--model auto`` (the default): the digits preset for the built-in digits, `recipe.choose` for a folder."""


def train_vision(model: str = AUTO, train: VisionTrainConfig | None = None,
                 out: str | os.PathLike = "runs/vision", *, dataset: str = "digits",
                 data_dir: str | os.PathLike | None = None, img_size: int | None = None, epochs: float | None = None,
                 init: str | os.PathLike | None = None, model_overrides: dict | None = None, overwrite: bool = False,
                 quiet: bool = False, tensorboard: bool = False, settings: dict | None = None,
                 budget: float | None = None) -> dict[str, float]:
    """Train ``model`` (a preset, or ``auto``) on digits or an ImageFolder tree; returns the last validation metrics.

    With ``auto`` on a folder, `recipe.choose` picks the model, augmentation, batch, learning rate and
    epochs from the images (recorded in config.json under "recipe"); ``settings`` (training fields),
    ``model_overrides``, ``img_size`` and ``epochs`` the caller chose win over it. ``budget`` (minutes)
    fits the epochs to the time available: a few steps are timed first. ``epochs`` sets the steps and
    validates (and checkpoints) after every epoch (default 30 for a preset). ``init`` is an official
    ``.npz`` (for a preset ``model``) or a vision run directory (whose architecture is used); a different
    number of classes gets a new zero head, a larger ``img_size`` resizes the token MLPs (Appendix C).
    """
    started = time.perf_counter()
    if budget is not None and (not math.isfinite(budget) or budget <= 0):
        raise ValueError(f"--budget must be a positive number of minutes, got {budget}")
    overrides = dict(model_overrides or {})
    data = load_data(dataset, data_dir, overrides.get("in_chans", 3))
    plan = _recipe_for(data) if model == AUTO and data_dir is not None else None
    model = "mixer_tiny_digits" if model == AUTO and plan is None else model
    chosen = dict(settings or {})  # what the caller set: it wins over the recipe
    recipe_warmup = plan is not None and train is None and "warmup" not in chosen
    settings = chosen
    if plan is not None:
        if init is not None and not Path(init).is_dir():
            raise ValueError("--init with an .npz checkpoint needs the --model preset it was trained as")
        data = dataclasses.replace(data, in_chans=plan.model["in_chans"], crop_pct=plan.crop_pct)
        settings = {**plan.train, **chosen}
        overrides = {**{k: v for k, v in plan.model.items() if k != "img_size" and init is None}, **overrides}
        img_size = img_size if img_size is not None else plan.model["img_size"]
        if not quiet:
            print("recipe for this folder (docs/vision.md; any flag you give wins):\n  " + "\n  ".join(plan.reasons),
                  file=sys.stderr)
    train = train or VisionTrainConfig(**settings)
    if epochs is None and budget is None and "steps" not in settings:
        epochs = plan.epochs if plan is not None else 30.0
    overrides = {"in_chans": data.in_chans, **overrides, "num_classes": len(data.train.class_names)}
    if img_size is not None:
        overrides["img_size"] = img_size
    torch.manual_seed(train.seed)
    net = initial_model(VisionConfig(**overrides) if plan is not None and init is None
                        else target_config(model, overrides, init), init)
    preprocess = _preprocess(data, net)
    task = VisionTask(data, preprocess, train, len(data.train.class_names), resolve_device(train.device))
    if budget is not None:
        epochs = _budget_epochs(budget, time.perf_counter() - started, net, task, train, Path(out), quiet)
    if epochs is not None:
        train = dataclasses.replace(steps_for_epochs(train, epochs, task.per_epoch), eval_every=task.per_epoch,
                                    ckpt_every=task.per_epoch, log_every=min(train.log_every, task.per_epoch))
        if recipe_warmup:
            train = dataclasses.replace(train, warmup=max(1, round(RECIPE_WARMUP * train.steps)))
    run_config = {"task": "vision", "model": net.config.to_dict(),
                  "data": {**data.source, "fingerprint": data.fingerprint()}, "class_names": data.train.class_names,
                  "preprocess": preprocess.to_dict(), "init": str(init) if init else None,
                  "recipe": _recipe_record(plan, budget, epochs)}
    with runs.new_run(Path(out), overwrite):
        return _fit_vision(net, task, train, Path(out), run_config, resume=False, quiet=quiet, tensorboard=tensorboard)


RECIPE_WARMUP = 0.05
"""The recipe's warm-up: this share of the run's steps."""


def _preprocess(data: ImageData, net: MlpMixer) -> Preprocess:
    """How files become inputs of ``net``, with the training images' polarity (from a sample of 256)."""
    hw, chans = net.config.image_hw, net.config.in_chans
    sample = data.train.load(torch.arange(min(len(data.train), 256)), Preprocess(hw, chans, crop_pct=data.crop_pct),
                             hw, data.crop_pct)
    return Preprocess(hw, chans, crop_pct=data.crop_pct, background=background_of(sample))


def _recipe_for(data: ImageData) -> Recipe:
    side, grey = image_survey(data.train.paths or [])
    return choose(FolderShape(len(data.train), len(data.train.class_names), side, grey))


def _recipe_record(plan: Recipe | None, budget: float | None, epochs: float | None) -> dict | None:
    if plan is None and budget is None:
        return None
    return {**(plan.to_dict() if plan else {}), "budget_minutes": budget, "epochs_run": epochs}


def _budget_epochs(budget: float, spent: float, net: MlpMixer, task: "VisionTask", train: VisionTrainConfig,
                   out: Path, quiet: bool) -> float:
    """Whole epochs that fit ``budget`` minutes, less the ``spent`` seconds of start-up, at the speed
    measured now (a few steps on a copy of the model)."""
    started = time.perf_counter()
    step_s, eval_s = time_step(net, task, train, net.config.hidden_dim, out)
    left = budget * 60 * BUDGET_SHARE - spent - (time.perf_counter() - started)
    epochs = epochs_for_budget(left, step_s, eval_s, task.per_epoch)
    if not quiet:
        print(f"budget {budget:g} min: {step_s * 1000:.0f} ms per step and {eval_s:.1f} s per validation measured "
              f"-> {epochs:g} epochs of {task.per_epoch} steps", file=sys.stderr)
    return epochs


BUDGET_SHARE = 0.8
"""The share of ``--budget`` planned for training and validation at the probed speed (start-up is subtracted
first): whole runs measured 1.2-1.35x slower per step than the probe (logging, checkpoints, the probe's
spread); 3-minute budgets took 166.6 s (this share, docs/vision.md) and 179.6 s (0.9, an earlier probe)."""


def resume_vision(out: str | os.PathLike, *, changes: dict | None = None, quiet: bool = False,
                  data_dir: str | os.PathLike | None = None, allow_changed_data: bool = False,
                  tensorboard: bool = False) -> dict[str, float]:
    """Continue the vision run in ``out`` from its last checkpoint (optionally to a new step count).

    The images are read from the folder saved with the run (absolute), or from ``data_dir`` when they
    moved; their fingerprint must match the saved one unless ``allow_changed_data``.
    """
    out = Path(out)
    with runs.open_run(out):
        saved, train = resumed_configs(out, "vision", changes or {}, VisionTrainConfig)
        source = saved.get("data") if isinstance(saved.get("data"), dict) else {}
        folder = data_dir if data_dir is not None else source.get("data_dir")
        if not quiet:
            print(f"resuming {out} on {repr(str(folder)) if folder else source.get('dataset', 'digits')}",
                  file=sys.stderr)
        net = MlpMixer(read_vision_config(out))
        data = load_data(source.get("dataset", "digits"), folder, net.config.in_chans)
        fingerprint = data.fingerprint()
        runs.check_fingerprint(source.get("fingerprint"), fingerprint, repr(str(folder)) if folder else "digits",
                               allow_changed_data)
        if data_dir is not None:
            runs.write_config(out, {**saved, "data": {**data.source, "fingerprint": fingerprint}})
        preprocess = Preprocess(**saved["preprocess"]) if isinstance(saved.get("preprocess"), dict) else \
            Preprocess(net.config.image_hw, net.config.in_chans, crop_pct=data.crop_pct)
        task = VisionTask(data, preprocess, train, len(saved["class_names"]), resolve_device(train.device))
        return _fit_vision(net, task, train, out, saved, resume=True, quiet=quiet, tensorboard=tensorboard)


def _fit_vision(net: MlpMixer, task: "VisionTask", train: VisionTrainConfig, out: Path, run_config: dict, *,
                resume: bool, quiet: bool, tensorboard: bool = False) -> dict[str, float]:
    net.set_grad_checkpointing(train.grad_checkpointing)
    return fit(net, task, train, out, d_model=net.config.hidden_dim, run_config=run_config, resume=resume,
               quiet=quiet, tensorboard=tensorboard)


def target_config(name: str, overrides: dict, init: str | os.PathLike | None) -> VisionConfig:
    """The model to train: the preset with ``overrides``, or a vision run's architecture when it is ``init``."""
    if init is None or not Path(init).is_dir():
        return VisionConfig.from_name(name, **overrides)
    saved = read_vision_config(init)
    return dataclasses.replace(saved, **{"img_size": saved.img_size, **overrides})


def initial_model(target: VisionConfig, init: str | os.PathLike | None = None) -> MlpMixer:
    """A fresh ``target`` model, or ``init``'s weights (an official .npz or a vision run directory) adapted
    to ``target``: a new zero head for other classes, token MLPs resized for a larger image (Appendix C)."""
    if init is None:
        return MlpMixer(target)
    source = Path(init)
    if source.is_dir():
        saved = read_vision_config(source)
        model = MlpMixer(dataclasses.replace(target, img_size=saved.img_size, num_classes=saved.num_classes))
        checkpoints.load_weights(model, source / checkpoints.MODEL_FILE)
    else:
        _, seq_len, classes = checkpoint_grid(source)
        side = math.isqrt(seq_len)
        if side * side != seq_len:
            raise ValueError(f"{source} has {seq_len} tokens, not a square grid; cannot infer its image size")
        model = MlpMixer(dataclasses.replace(target, img_size=side * target.patch_size))
        load_official_npz(model, source, load_head=classes == target.num_classes)
    if model.config.num_classes != target.num_classes:
        model.reset_classifier(target.num_classes)
    if model.config.image_hw != target.image_hw:
        resize_tokens(model, target.img_size)
    return model


def predict(run_dir: str | os.PathLike, images: list[str | os.PathLike], top_k: int = 5,
            device: str = "cpu") -> list[list[tuple[str, float]]]:
    """For each image file, the ``top_k`` (class name, probability) of the vision model in ``run_dir``."""
    if top_k <= 0:
        raise ValueError(f"--top-k must be positive, got {top_k}")
    model = MlpMixer.from_pretrained(run_dir).to(device)
    saved = runs.read_run_config(run_dir, "vision")
    if model.config.num_classes == 0:
        raise checkpoints.CheckpointError(f"the model in {str(run_dir)!r} has no classifier head")
    names = saved.get("class_names") or [str(i) for i in range(model.config.num_classes)]
    pre = saved.get("preprocess") or {"img_size": model.config.image_hw, "in_chans": model.config.in_chans}
    preprocess = Preprocess(**pre)
    x, inverted = preprocess.match_polarity(torch.stack([preprocess.load(path) for path in images]))
    for path in (p for p, flip in zip(images, inverted.tolist()) if flip):
        warnings.warn(DataWarning(f"{path}: its background is {'light' if preprocess.background == 'dark' else 'dark'}, "
                                  f"the training images' {preprocess.background}; inverted it to match"), stacklevel=2)
    x = x.to(device)
    with torch.no_grad():
        probs = model(preprocess.normalize(x)).float().softmax(-1)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [[(names[i], p) for p, i in zip(ps.tolist(), ids.tolist())] for ps, ids in zip(top.values, top.indices)]
