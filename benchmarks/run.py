"""All benchmarks, printed as Markdown: ``python -m benchmarks.run [--quick] [--only SECTION ...]``.

Sections: mlm (seed configuration vs labml-nn), vision (S/16 and B/16 vs mlp-mixer-pytorch and timm),
scaling (token mixer time vs N, also writes docs/scaling.png), checkpointing (B/16 memory and time).
bf16 autocast rows are added where the CPU multiplies bf16 natively. The full run takes about ten
minutes on two cores; ``--quick`` (smaller batches, fewer rounds) about five.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch

from . import checkpointing, common, mlm, scaling, vision

SECTIONS = ("mlm", "vision", "scaling", "checkpointing")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches and fewer rounds")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--threads", type=int, default=2, help="intra-op CPU threads (default 2)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast rows")
    parser.add_argument("--plot", default="docs/scaling.png", help="where the scaling plot goes ('' for none)")
    args = parser.parse_args(argv)
    q = args.quick
    bf16, why = common.bf16_native()
    print(f"## mlpmixer benchmarks, {datetime.date.today()}\n\n{common.cpu_name()}, {args.threads} threads, "
          f"torch {torch.__version__}, Python {platform.python_version()}; bf16: "
          f"{'native' if bf16 else 'not native'} ({why}); load average at start "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs{' — quick mode' if q else ''}\n")
    dtypes = [None] + ([torch.bfloat16] if bf16 and not args.no_bf16 else [])
    for section in args.only:
        start = time.perf_counter()
        if section == "mlm":
            for dtype in dtypes:
                print(mlm.run(2 if q else 3, 5 if q else 10, args.threads, dtype=dtype), "\n")
        elif section == "vision":
            models = {"mixer_s16_224": 8, "mixer_b16_224": 4} if q else {"mixer_s16_224": 32, "mixer_b16_224": 8}
            for dtype in dtypes:
                print(vision.run(models, 1, 2 if q else 3, args.threads, dtype=dtype), "\n")
        elif section == "scaling":
            lengths = scaling.LENGTHS[:-1] if q else scaling.LENGTHS
            print(scaling.run(8, 1, 3 if q else 5, args.threads, lengths=lengths, plot=args.plot or None), "\n")
        elif section == "checkpointing":
            print(checkpointing.run(4 if q else 8, 16 if q else 32, 1, 2 if q else 3, args.threads), "\n")
        print(f"<!-- {section}: {time.perf_counter() - start:.0f} s -->\n")


if __name__ == "__main__":
    main()
