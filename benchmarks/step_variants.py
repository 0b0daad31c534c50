"""A/B of the MLM seed step's variants, each alone in its own process (issue 17).

    python -m benchmarks.step_variants [--threads 2 1] [--rounds 6] [--variants malloc+keep floor ...] [--bf16]

Variants: ``library`` (glibc's malloc defaults, so σ(h) is recomputed in backward), ``malloc`` (malloc
keeps freed memory, σ(h) still recomputed), ``malloc+keep`` (what `mlpmixer train` runs: malloc keeps
freed memory and the fused MLP keeps a small σ(h)), ``torch-dropout`` (as ``malloc+keep``, with dropout's
masks made by torch operations instead of the compiled kernels: ``MLPMIXER_KERNELS=0``,
`mlpmixer.kernels`), ``modules`` (as ``malloc+keep``, with each residual branch through the block's
modules — LayerNorm, the fused MLP and the dropout-add as separate autograd nodes — instead of one
`fused.residual_mlp` node), and the GEMM-only floor; fp32, or bf16 autocast with ``--bf16``. Each process runs 5
warm-up and 30 timed steps; rounds alternate; medians of the rounds' medians, with their range, and each
round's time over the same round's floor (they run back to back, so a slow spell of the machine hits
both or neither more often than it hits two medians).
The dropped SFC64 dropout bits were measured the same way at commit d52d22d (``mlpmixer.rng``).
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from mlpmixer import allocator, fused, layers

from . import common, mlm

VARIANTS = ("library", "malloc", "malloc+keep", "torch-dropout", "modules", "floor")


def _step(variant: str, bf16: bool = False):
    if variant == "torch-dropout":
        os.environ["MLPMIXER_KERNELS"] = "0"
    if variant in ("malloc", "malloc+keep", "torch-dropout", "modules"):
        allocator.keep_freed_memory()
    if variant == "malloc":
        fused.KEEP_ACTIVATION_BYTES = 0
    if variant == "modules":
        layers.MixerBlock._fusable = lambda self, xs: False
    return mlm.make_step("floor" if variant == "floor" else "mlpmixer", mlm.Seed(), torch.bfloat16 if bf16 else None)


def _ratios(t: common.Timing | str, floor: common.Timing | str | None) -> str:
    """Each round's time over the same round's floor (the two ran back to back): their median, range and
    how many are within 1.5×, the issue's target."""
    if isinstance(t, str) or not isinstance(floor, common.Timing):
        return ""
    r = sorted(a / b for a, b in zip(t.rounds, floor.rounds))
    return (f"{statistics.median(r):.2f}× ({r[0]:.2f}–{r[-1]:.2f}; {sum(x <= 1.5 for x in r)} of {len(r)} "
            f"rounds ≤ 1.5×)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (the floor's products in bf16)")
    parser.add_argument("--time-child", nargs="+")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args(argv)
    if args.time_child:
        common.child_time(_step(args.time_child[0], "bf16" in args.time_child[1:]), args.warmup, args.reps)
        return
    print(f"MLM seed step variants, {'bf16 autocast' if args.bf16 else 'fp32'}; {common.header_conditions()}\n")
    extra = ("bf16",) if args.bf16 else ()
    for threads in args.threads:
        med = common.time_alone("benchmarks.step_variants", {v: (v, *extra) for v in args.variants}, rounds=args.rounds,
                                warmup=args.warmup, reps=args.reps, threads=threads)
        floor = med.get("floor")
        rows = [[v, t if isinstance(t, str) else f"{t.median * 1e3:.1f} ({t.spread()})", _ratios(t, floor)]
                for v, t in med.items()]
        print(f"### {threads} thread{'s' * (threads > 1)}\n\n"
              + common.table(["variant", "ms/step", "× floor (round by round: median, range, rounds ≤ 1.5×)"], rows))
        print()


if __name__ == "__main__":
    main()
