"""The vision model on one NVIDIA GPU: training and inference images/s under bf16 autocast, and the
fraction of the GPU's measured bf16 matrix-multiply peak that the FLOPs make (issue 7's H200 item).

    python -m benchmarks.gpu [--models mixer_b16_224] [--batch 256] [--contenders mlpmixer timm]
                             [--compile] [--rounds 3] [--json FILE]

Every figure comes from its own process (`_child`): a fresh model, ``--warmup`` untimed steps, then
``--rounds`` windows of ``--reps`` steps, each window timed with CUDA events around the whole window (so
the figure is the GPU's throughput, launch gaps included), the median window reported. The rounds of
the contenders alternate (the order reverses every round), as `common.time_alone` does on the CPU.

One training step is what `benchmarks.vision` times on the CPU: forward under bf16 autocast,
cross-entropy in float32 on random labels, backward, gradient clipping at 1.0, AdamW (`common.adamw`:
the fused kernel on CUDA), ``zero_grad(set_to_none=True)``; inference is a forward pass under
``torch.inference_mode`` and the same autocast. Parameters stay float32 (autocast casts them), as
`mlpmixer train --precision bf16` runs. FLOPs are `benchmarks.vision.flops` (the matrix products,
counted from the config); the peak is an 8192³ bf16 ``torch.mm`` timed the same way in its own process.
``--compile`` adds each contender under ``torch.compile`` (default mode) as a separate row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from . import vision

PEAK_N = 8192


def _timer(fn, warmup: int, reps: int, rounds: int, device: str) -> list[float]:
    """Seconds per call of ``fn``, one figure per window of ``reps`` calls (CUDA events around it; the
    wall clock on the CPU, where ``--device cpu`` only smoke-tests this script)."""
    for _ in range(warmup):
        fn()
    out = []
    if device == "cpu":
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            out.append((time.perf_counter() - t0) / reps)
        return out
    torch.cuda.synchronize()
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3 / reps)
    return out


def peak_step(n: int = PEAK_N, device: str = "cuda"):
    """A bf16 ``n``³ matrix product, and its FLOPs."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    return (lambda: torch.mm(a, b, out=out)), 2.0 * n ** 3


def model_step(contender: str, name: str, batch: int, train: bool, compiled: bool, device: str = "cuda"):
    """A closure running one bf16-autocast training step (or a forward pass) on a fixed batch on ``device``:
    `benchmarks.vision.model_step`, the CPU tables' step."""
    step = vision.model_step(contender, name, train, torch.bfloat16, device=device, compiled=compiled)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, device=device, generator=g)
    y = torch.randint(0, 1000, (batch,), device=device, generator=g)
    return lambda: step(x, y)


def _child(args: argparse.Namespace) -> None:
    kind = args.child[0]
    if kind == "peak":
        fn, _ = peak_step(args.peak_n, args.device)
    else:
        contender, name, mode, batch = args.child[0], args.child[1], args.child[2], int(args.child[3])
        fn = model_step(contender.removesuffix("+compile"), name, batch, mode == "train",
                        contender.endswith("+compile"), args.device)
    seconds = _timer(fn, args.warmup, args.reps, args.rounds_per_child, args.device)
    memory = torch.cuda.max_memory_allocated() / 2 ** 30 if args.device != "cpu" else float("nan")
    print(json.dumps({"seconds": seconds, "max_memory_gib": memory}))


def _run(job: list[str], args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--child", *job, "--warmup", str(args.warmup),
           "--reps", str(args.reps), "--rounds-per-child", "1", "--device", args.device, "--peak-n", str(args.peak_n)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mixer_b16_224"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--contenders", nargs="+", default=["mlpmixer", "timm"])
    parser.add_argument("--compile", action="store_true", help="also time each contender under torch.compile")
    parser.add_argument("--rounds", type=int, default=3, help="processes per figure, alternating")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (a smoke test of this script only)")
    parser.add_argument("--peak-n", type=int, default=PEAK_N, help="the peak's square matrix size")
    parser.add_argument("--rounds-per-child", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.child:
        return _child(args)
    if args.device != "cpu" and not torch.cuda.is_available():
        sys.exit("benchmarks.gpu needs a CUDA device; none is visible here (torch.cuda.is_available() is False)")
    contenders = [c for c in args.contenders]
    if args.compile:
        contenders += [c + "+compile" for c in args.contenders]
    jobs = {("peak",): ["peak"]}
    for name in args.models:
        for mode in ("train", "infer"):
            for c in contenders:
                jobs[(c, name, mode)] = [c, name, mode, str(args.batch)]
    per: dict[tuple, list[float]] = {k: [] for k in jobs}
    memory: dict[tuple, float] = {}
    errors: dict[tuple, str] = {}
    keys = list(jobs)
    t0 = time.perf_counter()
    for r in range(args.rounds):
        for k in keys if r % 2 == 0 else keys[::-1]:
            if k in errors:
                continue
            res = _run(jobs[k], args)
            if "error" in res:
                errors[k] = res["error"]
                print(f"{' '.join(k)}: {res['error']}", flush=True)
                continue
            per[k].extend(res["seconds"])
            memory[k] = res["max_memory_gib"]
            print(f"round {r + 1}: {' '.join(k)} {res['seconds'][0] * 1e3:.2f} ms "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    peak_flops = 2.0 * args.peak_n ** 3
    peak = statistics.median(per[("peak",)]) if per[("peak",)] else float("nan")
    peak_rate = peak_flops / peak
    where = torch.cuda.get_device_name(args.device) if args.device != "cpu" else "CPU (smoke test)"
    print(f"\n{where}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"batch {args.batch}, bf16 autocast; medians of {args.rounds} processes × {args.reps} steps")
    print(f"bf16 matmul peak ({args.peak_n}³ torch.mm): {peak_rate / 1e12:.0f} TFLOP/s "
          f"({', '.join(f'{peak_flops / s / 1e12:.0f}' for s in per[('peak',)])})\n")
    print("| model | mode | contender | ms/step | images/s | TFLOP/s | of bf16 peak | peak memory |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for k in keys[1:]:
        c, name, mode = k
        if k in errors:
            print(f"| {name} | {mode} | {c} | {errors[k]} | | | | |")
            continue
        s = statistics.median(per[k])
        rate = vision.flops(name, args.batch, mode == "train") / s
        rows.append({"model": name, "mode": mode, "contender": c, "seconds": per[k], "median_s": s,
                     "images_per_s": args.batch / s, "tflops": rate / 1e12, "of_peak": rate / peak_rate,
                     "max_memory_gib": memory[k]})
        print(f"| {name} | {mode} | {c} | {s * 1e3:.1f} ({min(per[k]) * 1e3:.1f}–{max(per[k]) * 1e3:.1f}) | "
              f"{args.batch / s:,.0f} | {rate / 1e12:.0f} | {rate / peak_rate:.0%} | {memory[k]:.1f} GiB |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "torch": torch.__version__, "batch": args.batch,
                       "peak_tflops": peak_rate / 1e12, "peak_seconds": per[("peak",)], "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
