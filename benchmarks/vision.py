"""Mixer-S/16 and Mixer-B/16 at 224: training step and inference, mlpmixer vs mlp-mixer-pytorch (and timm).

Same architecture in every contender (Table 1 of the paper; mlp-mixer-pytorch's ``expansion_factor``
is the *token* MLP's width over C and ``expansion_factor_token`` the channel MLP's, so S/16 is
0.5 and 4), exact GELU, no dropout. One training step = forward, cross-entropy on random labels,
backward, gradient clipping at 1.0, AdamW (`common.adamw`), ``zero_grad(set_to_none=True)``; inference =
forward under ``torch.inference_mode``. Optional bfloat16 autocast for both.

FLOPs per image, forward (matrix products): stem 2·S·(P²·3)·C, and per block 4·C·S·D_S (token MLP)
+ 4·S·C·D_C (channel MLP), head 2·C·classes; a training step is 3× that minus the stem's input
gradient, which is not computed (2·S·P²·3·C less).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from mlpmixer import create_model
from mlpmixer.vision import VisionConfig

from . import common


def flops(name: str, batch: int, train: bool) -> float:
    c = VisionConfig.from_name(name)
    s, p, k = c.num_patches, c.patch_size, 3 * c.patch_size ** 2
    stem = 2 * s * k * c.hidden_dim
    blocks = c.num_blocks * (4 * c.hidden_dim * s * c.tokens_mlp_dim + 4 * s * c.hidden_dim * c.channels_mlp_dim)
    head = 2 * c.hidden_dim * c.num_classes
    fwd = stem + blocks + head
    return batch * (3 * fwd - stem if train else fwd)


def build(contender: str, name: str) -> nn.Module:
    c = VisionConfig.from_name(name)
    if contender == "mlpmixer":
        return create_model(name)
    if contender == "mlp-mixer-pytorch":
        from mlp_mixer_pytorch import MLPMixer
        return MLPMixer(image_size=c.img_size, channels=3, patch_size=c.patch_size, dim=c.hidden_dim,
                        depth=c.num_blocks, num_classes=c.num_classes,
                        expansion_factor=c.tokens_mlp_dim / c.hidden_dim,
                        expansion_factor_token=c.channels_mlp_dim / c.hidden_dim)
    if contender == "timm":
        import timm
        return timm.create_model(name, pretrained=False)
    raise ValueError(contender)


def available() -> tuple[list[str], list[str]]:
    """Contenders that import here, and a reason for each that does not."""
    names, skipped = ["mlpmixer"], []
    try:
        import mlp_mixer_pytorch  # noqa: F401
        names.append("mlp-mixer-pytorch")
    except ImportError as e:
        skipped.append(f"mlp-mixer-pytorch skipped: {e} (pip install -e '.[bench]')")
    try:
        import timm  # noqa: F401
        names.append("timm")
    except Exception as e:  # timm imports torchvision; any failure to import means "not here"
        skipped.append(f"timm skipped: cannot import it here ({type(e).__name__}: {e})")
    return names, skipped


def make_step(contender: str, name: str, batch: int, train: bool, dtype: torch.dtype | None = None,
              grad_checkpointing: bool = False):
    """A closure running one training step (or inference) on a fixed random batch."""
    step = model_step(contender, name, train, dtype, grad_checkpointing)
    x, y = images(batch)
    return lambda: step(x, y)


def images(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 224, 224, generator=g), torch.randint(0, 1000, (batch,), generator=g)


def model_step(contender: str, name: str, train: bool, dtype: torch.dtype | None = None,
               grad_checkpointing: bool = False, device: str = "cpu", compiled: bool = False):
    """``step(x, y)``: one training step (or a forward pass) of a fresh model on any batch, on ``device``
    (``x`` and ``y`` there too), under ``torch.compile`` when ``compiled``."""
    torch.manual_seed(0)
    model = build(contender, name).to(device)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    run = torch.compile(model) if compiled else model
    autocast = torch.autocast(torch.device(device).type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    if not train:
        model.eval()

        def infer(x: torch.Tensor, y: torch.Tensor) -> None:
            with torch.inference_mode(), autocast:
                run(x)

        return infer
    model.train()
    opt = common.adamw(model.parameters())

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast:
            loss = F.cross_entropy(run(x).float(), y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run(models: dict[str, int], rounds: int, warmup: int, reps: int, threads: int = 2,
        dtype: torch.dtype | None = None, memory: bool = True, interleaved: bool = False) -> str:
    """One table per model: train and inference rows per contender. ``models``: name -> batch. Each
    contender and the matmul peak alone in its own process (`common.time_alone`), or, ``interleaved``,
    alternately in this one (the old method)."""
    names, skipped = available()
    label = "bf16 autocast" if dtype is not None else "fp32"
    extra = ["bf16"] if dtype is not None else []
    how = (f"all in this process, alternating, {warmup} warm-up + {rounds * reps} timed rounds" if interleaved else
           f"each alone in its own process, {rounds} alternating rounds of {warmup} warm-up + {reps} timed calls")
    out = [f"### Vision, {label}, {threads} thread{'s' * (threads > 1)} ({how}; medians)", ""]
    out += [f"- {s}" for s in skipped]
    for name, batch in models.items():
        jobs = {"peak": ("peak", *extra)}
        for mode in ("train", "infer"):
            jobs.update({(n, mode): (n, name, str(batch), mode, *extra) for n in names})
        if interleaved:
            torch.set_num_threads(threads)
            fns = {k: _step(*j) for k, j in jobs.items()}
            med = common.time_in_process(fns, warmup, rounds * reps)
        else:
            med = common.time_alone("benchmarks.vision", jobs, rounds=rounds, warmup=warmup, reps=reps,
                                    threads=threads)
        if isinstance(med["peak"], str):
            out += ["", f"**{name}**: the matmul peak failed: {med['peak']}"]
            continue
        peak = common.PEAK_FLOPS / med["peak"].median
        mem = {n: common.peak_memory("benchmarks.vision", n, name, str(batch), *extra, threads=threads)
               for n in names} if memory else {}
        rows = []
        for mode in ("train", "infer"):
            f = flops(name, batch, mode == "train")
            for n in names:
                t = med[(n, mode)]
                if isinstance(t, str):
                    rows.append([n, mode, t, "", "", "", "", "", ""])
                    continue
                ref, timm_t = med.get(("mlp-mixer-pytorch", mode)), med.get(("timm", mode))
                m = mem.get(n, {}) if mode == "train" else {}
                rows.append([n, mode, f"{t.median:.3f} ({t.spread(1, 3)})", f"{batch / t.median:.2f}",
                             f"{ref.median / t.median:.2f}×" if isinstance(ref, common.Timing) else "—",
                             f"{timm_t.median / t.median:.2f}×" if isinstance(timm_t, common.Timing) else "—",
                             common.gflops(f / t.median), f"{f / t.median / peak:.0%}",
                             common.mib(m["peak_bytes"]) if "peak_bytes" in m else m.get("error", "")])
        out += ["", f"**{name}**, batch {batch}; {label} 2048² matmul peak {common.gflops(peak)} GFLOP/s", "",
                common.table(["model", "step", "s/step", "images/s", "vs mlp-mixer-pytorch", "vs timm", "GFLOP/s",
                              "of peak", "train peak memory"], rows)]
    return "\n".join(out)


def _step(contender: str, *rest: str):
    """The call a timing child times: ``peak [bf16]`` or ``CONTENDER NAME BATCH train|infer [bf16]``."""
    bf16 = "bf16" in rest
    if contender == "peak":
        return common.matmul(dtype=torch.bfloat16 if bf16 else torch.float32)[0]
    name, batch, mode = rest[:3]
    return make_step(contender, name, int(batch), mode == "train", torch.bfloat16 if bf16 else None)


def _child(contender: str, name: str, batch: str, *rest: str) -> None:
    """Peak of one training step at ``batch``, after a warm-up step at batch 2 that creates AdamW's state."""
    common.warm_libraries()
    baseline = common.rest_kib()
    step = model_step(contender, name, True, torch.bfloat16 if "bf16" in rest else None,
                      grad_checkpointing="ckpt" in rest)
    step(*images(2))
    x, y = images(int(batch))
    common.child_report(lambda: step(x, y), baseline, warmup=0, steps=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The vision tables alone; python -m benchmarks.run runs every section.")
    parser.add_argument("--memory-child", nargs="+")
    parser.add_argument("--time-child", nargs="+")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    if args.memory_child:
        _child(*args.memory_child)
    elif args.time_child:
        common.child_time(_step(*args.time_child), args.warmup, args.reps)
    else:
        print(run({"mixer_s16_224": 8}, 2, 1, 3, threads=1))
