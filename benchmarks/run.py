"""All benchmarks, printed as Markdown: ``python -m benchmarks.run [--quick] [--only SECTION ...]``.

Sections: mlm (the seed configuration's training step beside its GEMM-only floor, vs labml-nn), vision
(S/16 and B/16 vs mlp-mixer-pytorch and timm), scaling (token mixer time vs N, also writes
docs/scaling.png), checkpointing (B/16 memory and time). bf16 autocast rows are added where the CPU
multiplies bf16 natively. mlm and vision time every contender alone in its own process, rounds
alternating (``--interleaved``: the old method, all in this process). Run it on an idle machine: the
header prints the load average.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch

from . import checkpointing, common, mlm, scaling, vision

SECTIONS = ("mlm", "vision", "scaling", "checkpointing")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches and fewer rounds")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--threads", type=int, nargs="+", default=[2],
                        help="intra-op CPU threads; several values give a set of tables for each (default 2)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast rows")
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternating rounds of fresh processes per contender (default 3, --quick 2)")
    parser.add_argument("--interleaved", action="store_true",
                        help="the old method: time the mlm and vision contenders alternately in this one process")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory columns (faster)")
    parser.add_argument("--plot", default="docs/scaling.png", help="where the scaling plot goes ('' for none)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 3)
    bf16, why = common.bf16_native()
    threads = ", ".join(map(str, args.threads))
    print(f"## mlpmixer benchmarks, {datetime.date.today()}\n\n{common.cpu_name()}, threads {threads}, "
          f"torch {torch.__version__}, Python {platform.python_version()}; bf16: "
          f"{'native' if bf16 else 'not native'} ({why}); {common.header_conditions()}{' — quick mode' if args.quick else ''}\n")
    dtypes = [None] + ([torch.bfloat16] if bf16 and not args.no_bf16 else [])
    for section in args.only:
        for n_threads in args.threads:
            start = time.perf_counter()
            run_section(section, n_threads, dtypes, rounds, args)
            print(f"<!-- {section}, {n_threads} threads: {time.perf_counter() - start:.0f} s; "
                  f"{common.header_conditions()} at its end -->\n")


def run_section(section: str, threads: int, dtypes: list, rounds: int, args: argparse.Namespace) -> None:
    q = args.quick
    if section == "mlm":
        # 12 warm-up steps: `mlpmixer train`'s step settles after about 10 (its heap's growth and first
        # page touches, oneDNN's products for the head's few padded shapes); timing from step 3 caught
        # 2-3 ms of that start on every contender's behalf (docs/benchmarks.md, 2026-11-30)
        for dtype in dtypes:
            print(mlm.run(rounds, 2 if q else 12, 5 if q else 20, threads, dtype=dtype,
                          interleaved=args.interleaved, memory=not args.no_memory), "\n")
    elif section == "vision":
        models = {"mixer_s16_224": 8, "mixer_b16_224": 4} if q else {"mixer_s16_224": 32, "mixer_b16_224": 8}
        for dtype in dtypes:
            print(vision.run(models, rounds, 1, 2 if q else 3, threads, dtype=dtype,
                             memory=not args.no_memory, interleaved=args.interleaved), "\n")
    elif section == "scaling":
        lengths = scaling.LENGTHS[:-1] if q else scaling.LENGTHS
        print(scaling.run(8, 1, 3 if q else 5, threads, lengths=lengths, plot=args.plot or None), "\n")
    elif section == "checkpointing":
        print(checkpointing.run(4 if q else 8, 16 if q else 32, 1, 2 if q else 3, threads), "\n")

if __name__ == "__main__":
    main()
