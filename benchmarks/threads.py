"""Training throughput against ``--threads``, on an idle machine and with one core kept busy.

Each measurement is a real `mlpmixer train` in its own process (nothing else of ours in it), the
contenders alternate over rounds, and the figure is the median of the logged tokens/s (images/s for
vision) after the first logged window. "One core busy" runs a `yes > /dev/null` beside the training,
as another user's job would. ``--threads 0`` is the default: the command picks the count itself.

    python -m benchmarks.threads [--rounds 2] [--mlm-steps 150] [--vision-epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"


def train_command(task: str, threads: int, out: Path, args: argparse.Namespace) -> list[str]:
    common = ["--threads", str(threads), "--quiet", "--out", str(out)]
    if task == "mlm":  # the seed configuration (the defaults), a short run
        data = ["--text-file", str(SHARED)] if SHARED.is_file() else ["--corpus", "shakespeare"]
        steps = str(args.mlm_steps)
        return ["train", "mlm", *data, "--steps", steps, "--log-every", "10", "--eval-every", steps,
                "--ckpt-every", steps, "--max-val-windows", "64", "--warmup", "10", *common]
    return ["train", "vision", "--epochs", str(args.vision_epochs), "--log-every", "5", *common]


def throughput(task: str, threads: int, busy: bool, args: argparse.Namespace) -> tuple[float, int]:
    """Median tokens (images) per second of one run, and the threads it used."""
    hog = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) if busy else None
    try:
        if hog:
            time.sleep(1.0)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
            done = subprocess.run([sys.executable, "-m", "mlpmixer", *train_command(task, threads, out, args)],
                                  env=env, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(done.stderr)
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
            used = json.loads((out / "config.json").read_text())["environment"]["threads"]
            return statistics.median(rates), used
    finally:
        if hog:
            hog.kill()
            hog.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mlm-steps", type=int, default=150)
    parser.add_argument("--vision-epochs", type=float, default=3)
    parser.add_argument("--tasks", default="mlm,vision")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(f"# threads benchmark: {os.cpu_count()} cores, load average {load:.2f} at the start, "
          f"{args.rounds} rounds, medians", flush=True)
    results: dict[tuple, list[float]] = {}
    used: dict[tuple, int] = {}
    for _ in range(args.rounds):
        for task in args.tasks.split(","):
            for busy in (False, True):
                for threads in (1, 2, 0):
                    rate, n = throughput(task, threads, busy, args)
                    results.setdefault((task, busy, threads), []).append(rate)
                    used[(task, busy, threads)] = n
                    print(f"{task} {'busy' if busy else 'idle'} threads={threads or 'default'}: {rate:,.0f}/s "
                          f"({n} used)", flush=True)
    print("\n| task | machine | 1 thread | 2 threads | default (threads used) | default vs best |")
    print("|---|---|---:|---:|---:|---:|")
    for task in args.tasks.split(","):
        for busy in (False, True):
            one, two, auto = (statistics.median(results[(task, busy, t)]) for t in (1, 2, 0))
            print(f"| {task} | {'one core busy' if busy else 'idle'} | {one:,.0f} | {two:,.0f} | {auto:,.0f} "
                  f"({used[(task, busy, 0)]}) | {max(one, two) / auto:.2f}× |")


if __name__ == "__main__":
    main()
