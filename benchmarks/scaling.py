"""How one token mixer's forward + backward time grows with the sequence length N, at fixed width.

Contenders, all at d_model D = 128 on a batch of B sequences, the input laid out as the encoder
lays it out (a (B, N, D) view of sequence-first memory):
  - mlp, tokens_mlp_dim 128: the token-mixing MLP with a fixed hidden width; FLOPs 4·B·D·N·D_S, linear in N
  - mlp, tokens_mlp_dim N: hidden width growing with N (the seed's 4·N would be larger still); quadratic
  - attention, 8 heads: QKV and output projections 8·B·N·D² plus scores and mixing 4·B·N²·D
  - fourier (FNet): Re(FFT2), no parameters; about 5·B·N·D·(log2 N + log2 D) for the two complex FFTs
  - gmlp, d_ffn 256 (= the seed's d_ff): channel projections 3·B·N·D·F plus the spatial gate B·N²·F
(forward FLOPs; forward + backward is counted as 3×, which for the FFT is only an estimate). Writes a
table, and a log–log plot to docs/scaling.png.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from mlpmixer import FourierMixing, GatedMlpMixer, SelfAttention, TokenMixingMlp

from . import common

D, HEADS, GMLP_FFN = 128, 8, 256
LENGTHS = (32, 64, 128, 256, 512, 1024)
MIXERS = ("mlp, D_S=128", "mlp, D_S=N", "attention", "fourier", "gmlp")


def build(kind: str, n: int) -> torch.nn.Module:
    if kind == "attention":
        return SelfAttention(D, HEADS)
    if kind == "fourier":
        return FourierMixing(n)
    if kind == "gmlp":
        return GatedMlpMixer(D, GMLP_FFN, n)
    return TokenMixingMlp(n, 128 if kind == "mlp, D_S=128" else n)


def flops(kind: str, n: int, batch: int) -> float:
    if kind == "attention":
        fwd = 8 * batch * n * D * D + 4 * batch * n * n * D
    elif kind == "fourier":
        fwd = 5 * batch * n * D * (math.log2(n) + math.log2(D))
    elif kind == "gmlp":
        fwd = 3 * batch * n * D * GMLP_FFN + batch * n * n * GMLP_FFN
    else:
        fwd = 4 * batch * D * n * (128 if kind == "mlp, D_S=128" else n)
    return 3.0 * fwd


def make_step(kind: str, n: int, batch: int):
    torch.manual_seed(0)
    mixer = build(kind, n).train()
    xs = torch.randn(n, batch, D, requires_grad=True)  # sequence-first memory
    grad = torch.randn(batch, n, D)

    def step() -> None:
        mixer(xs.transpose(0, 1)).backward(grad)  # (B, N, D) view, as MixerBlock passes it
        xs.grad = None
        for p in mixer.parameters():
            p.grad = None

    return step


def run(batch: int, warmup: int, reps: int, threads: int = 2, lengths=LENGTHS,
        plot: str | None = "docs/scaling.png") -> str:
    torch.set_num_threads(threads)
    mm, mm_flops = common.matmul()
    rows, times = [], {k: [] for k in MIXERS}
    for n in lengths:
        fns = {"peak": mm, **{k: make_step(k, n, batch) for k in MIXERS}}
        med = common.timed_rounds(fns, warmup, reps)
        peak = mm_flops / med["peak"]
        row = [n]
        for k in MIXERS:
            times[k].append(med[k])
            row += [f"{med[k] * 1e3:.2f}", f"{flops(k, n, batch) / med[k] / peak:.0%}"]
        rows.append(row)
    if plot:
        save_plot(times, lengths, batch, threads, plot)
    header = ["N"] + [h for k in MIXERS for h in (f"{k} ms", "of peak")]
    return (f"### Token mixer scaling: one layer, forward + backward, D = {D}, batch {batch} ({threads} threads, "
            f"{warmup} warm-up + {reps} timed rounds, medians)\n\n" + common.table(header, rows))


def save_plot(times: dict[str, list[float]], lengths, batch: int, threads: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, ts in times.items():
        ax.loglog(lengths, [t * 1e3 for t in ts], "o-", label=k)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(lengths), [str(n) for n in lengths])
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("ms per forward + backward")
    ax.set_title(f"One token mixer, D = {D}, batch {batch}, {threads} CPU thread{'s' if threads != 1 else ''}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(run(args.batch, 1, 3, args.threads, plot=None))
