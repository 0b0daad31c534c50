"""Shared benchmark machinery: timing each contender alone in its own process, the matmul peak,
peak memory, Markdown.

Timing (`time_alone`, the default): each contender (and the matmul that defines the peak, and the
GEMM-only floor) runs **alone in a fresh process**: ``warmup`` untimed calls, then ``reps`` timed ones,
whose median is that process's figure. Rounds alternate between the contenders' processes (the order
reverses every round) and the reported figure is the median over rounds. Nothing else of ours shares
the process, as when a user runs `mlpmixer train`. Measured on the MLM step (issue 17): timing
contenders alternately inside one process (`timed_rounds`, the old method, ``--interleaved``) made the
floor 27 % slower, labml-nn 11 % and mlpmixer 48 % at 2 threads, each figure hurt by the others' heap.

Memory: each contender runs in a fresh subprocess (see `peak_memory`), with glibc's malloc told to
serve every allocation >= 64 KiB by ``mmap`` (``MALLOC_MMAP_THRESHOLD_``), so freed tensors go back
to the OS and the resident set tracks live tensors. After warm-up the kernel's high-water mark is
reset (``/proc/self/clear_refs``), some steps run, and we report VmHWM minus the resident size of
the interpreter with torch imported and its kernel libraries initialised on a tiny model
(`warm_libraries`): parameters, gradients, optimiser state and the step's activations and
temporaries.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

MMAP_THRESHOLD = 65536


@dataclass(frozen=True)
class Timing:
    """Seconds per call: ``median`` over rounds of each round's process median (``rounds``)."""

    median: float
    rounds: tuple[float, ...]

    def spread(self, unit: float = 1e3, digits: int = 1) -> str:
        """The rounds' range, e.g. ``94.1–97.3``, in ``unit`` (ms by default)."""
        return f"{min(self.rounds) * unit:.{digits}f}–{max(self.rounds) * unit:.{digits}f}"


def time_alone(module: str, jobs: dict[Hashable, Sequence[str]], *, rounds: int, warmup: int, reps: int,
               threads: int) -> dict[Hashable, Timing | str]:
    """Time each job in a fresh ``python -m module --time-child ARGS...`` process, ``rounds`` times,
    alternating (the order reverses every round). A job whose process fails maps to its error line."""
    keys = list(jobs)
    per: dict[Hashable, list[float]] = {k: [] for k in keys}
    errors: dict[Hashable, str] = {}
    for r in range(rounds):
        for k in keys if r % 2 == 0 else keys[::-1]:
            if k in errors:
                continue
            out = _run_child(module, ["--time-child", *jobs[k], "--warmup", str(warmup), "--reps", str(reps)],
                             threads)
            if "error" in out:
                errors[k] = out["error"]
            else:
                per[k].append(statistics.median(out["seconds"]))
    return {k: errors[k] if k in errors else Timing(statistics.median(per[k]), tuple(per[k])) for k in keys}


def child_time(step: Callable[[], object], warmup: int, reps: int) -> None:
    """In a timing child: run ``step`` ``warmup`` times, then print the seconds of ``reps`` calls as JSON."""
    for _ in range(warmup):
        step()
    seconds = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)
    print(json.dumps({"seconds": seconds}))


def _run_child(module: str, args: list[str], threads: int, env: dict[str, str] | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, cwd=root)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_in_process(contenders: dict[Hashable, Callable[[], object]], warmup: int, reps: int) -> dict[Hashable, Timing]:
    """`timed_rounds` (the old method) as `Timing`s, so its tables are built like `time_alone`'s."""
    return {k: Timing(t, (t,)) for k, t in timed_rounds(contenders, warmup, reps).items()}


def timed_rounds(contenders: dict[str, Callable[[], object]], warmup: int, reps: int) -> dict[str, float]:
    """Median seconds per call of each contender, run alternately in this process (one call each per
    round): the old method, kept to show how much it moves the figures (``--interleaved``)."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(warmup + reps):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}


def adamw(params) -> torch.optim.Optimizer:
    """The benchmarks' optimiser, the same for every contender: `mlpmixer train`'s AdamW
    (`mlpmixer.train.adamw`: torch's fused CPU kernel, one pass over each tensor, no foreach temporaries
    the size of the model; else foreach) at lr 1e-4, one parameter group."""
    from mlpmixer.train import adamw as train_adamw

    return train_adamw([{"params": list(params)}], lr=1e-4)


PEAK_N = 2048
PEAK_FLOPS = 2.0 * PEAK_N ** 3  # `matmul`'s at its default size


def matmul(n: int = PEAK_N, dtype: torch.dtype = torch.float32) -> tuple[Callable[[], object], float]:
    """A large square ``torch.mm`` and its FLOPs: the machine's matrix-multiply peak for ``dtype``."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    return (lambda: torch.mm(a, b, out=out)), 2.0 * n ** 3


def bf16_native() -> tuple[bool, str]:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), and the evidence."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    if not torch.backends.mkldnn.is_available():
        return False, "oneDNN (mkldnn) is not available in this torch build"
    if not native:
        return False, "the CPU flags have neither avx512_bf16 nor amx_bf16"
    return True, "CPU flags: " + ", ".join(native)


def header_conditions() -> str:
    """The machine's load average and CPU count, for a table's header."""
    return f"load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return "unknown CPU"


# --- peak memory in a fresh process ---------------------------------------------------------------

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def warm_libraries() -> None:
    """Run a tiny model once in fp32 and bf16, so that kernel libraries (oneDNN, BLAS) are loaded and
    initialised before the baseline is taken and their code does not count as a model's memory."""
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.Flatten(2), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 16),
                          nn.Dropout(0.1))
    opt = adamw(model.parameters())
    for dtype in (None, torch.bfloat16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            loss = model(torch.randn(2, 3, 16, 16)).float().square().mean()
        loss.backward()
        opt.step()


def rest_kib() -> int:
    """Resident size now, in KiB."""
    return _status_kib("VmRSS")


def measure_peak(step: Callable[[], object], warmup: int = 1, steps: int = 2) -> int:
    """Bytes of the resident high-water mark during ``steps`` calls of ``step``, after ``warmup``."""
    for _ in range(warmup):
        step()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    for _ in range(steps):
        step()
    return _status_kib("VmHWM") * 1024


def peak_memory(module: str, *args: str, threads: int = 2) -> dict:
    """Run ``python -m module --memory-child args`` in a fresh process; it prints one JSON line."""
    return _run_child(module, ["--memory-child", *args], threads, {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)})


def child_report(step: Callable[[], object], baseline_kib: int, warmup: int = 1, steps: int = 2) -> None:
    """In a memory child: print the step's peak above the baseline (`warm_libraries`, then
    `rest_kib`, before the model is built), as one JSON line."""
    peak = measure_peak(step, warmup, steps)
    print(json.dumps({"peak_bytes": peak - baseline_kib * 1024}))


# --- output ---------------------------------------------------------------------------------------

def table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2 ** 20:,.0f} MiB"


def gflops(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e9:,.1f}"
