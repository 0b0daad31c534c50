"""Activation (gradient) checkpointing on Mixer-B/16: peak training memory and step time, off vs on.

``MlpMixer.set_grad_checkpointing(True)`` keeps only each block's input for backward and recomputes
the block there. Peak memory is measured per variant in a fresh process (see `common`); it includes
the parameters, their gradients and AdamW's two moments (16 bytes per parameter, 958 MB for B/16),
which checkpointing cannot shrink, so the table also gives the peak above that fixed state.
"""

from __future__ import annotations

import argparse

import torch

from mlpmixer.vision import VisionConfig

from . import common, vision

NAME = "mixer_b16_224"


def state_bytes(name: str = NAME) -> int:
    """Parameters + gradients + AdamW's exp_avg and exp_avg_sq, fp32."""
    from mlpmixer import create_model

    with torch.device("meta"):
        n = sum(p.numel() for p in create_model(name).parameters())
    return 16 * n


def run(time_batch: int, memory_batch: int, warmup: int, reps: int, threads: int = 2) -> str:
    torch.set_num_threads(threads)
    fns = {ckpt: vision.make_step("mlpmixer", NAME, time_batch, True, grad_checkpointing=ckpt) for ckpt in (False, True)}
    med = common.timed_rounds(fns, warmup, reps)
    state = state_bytes()
    rows = []
    mem = {ckpt: common.peak_memory("benchmarks.vision", "mlpmixer", NAME, str(memory_batch), *(["ckpt"] if ckpt else []),
                                    threads=threads) for ckpt in (False, True)}
    for ckpt in (False, True):
        peak = mem[ckpt].get("peak_bytes")
        rows.append(["on" if ckpt else "off", f"{med[ckpt]:.2f}", f"{med[ckpt] / med[False] - 1:+.0%}",
                     common.mib(peak) if peak else mem[ckpt].get("error"),
                     common.mib(peak - state) if peak else "",
                     f"{mem[False]['peak_bytes'] / peak:.2f}×" if peak and "peak_bytes" in mem[False] else ""])
    c = VisionConfig.from_name(NAME)
    return (f"### Gradient checkpointing, {NAME} fp32 training step ({threads} threads; time: batch {time_batch}, "
            f"{warmup} warm-up + {reps} timed rounds, medians; memory: batch {memory_batch})\n\n"
            f"Fixed state (params + grads + AdamW moments, {c.num_blocks} blocks): {common.mib(state)}.\n\n"
            + common.table(["checkpointing", "s/step", "time vs off", "peak memory", "above fixed state",
                            "reduction"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--time-batch", type=int, default=8)
    parser.add_argument("--memory-batch", type=int, default=32)
    args = parser.parse_args()
    print(run(args.time_batch, args.memory_batch, 1, 3, args.threads))
