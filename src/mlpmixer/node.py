"""The residual-MLP node's forward and backward bodies as torch operators in C++ (`node.cpp`).

`fused.residual_mlp` runs each Mixer branch (Eq. 1 or Eq. 2 with its LayerNorm and residual) as one
autograd node. Its bodies are a dozen operations each; called from Python, their dispatch cost more
than the operations themselves at small sizes (issue 17: about 0.5 ms per node and step at the MLM seed
configuration). `node.cpp` makes the same calls in the same order from C++: the same ATen operators, the
same compiled kernels (`kernels`, whose addresses it is handed) and the same draws from torch's
generator, so its results equal the Python bodies' bit for bit (tests/test_node.py). The same library
holds the optimiser's step (`optim.cpp`, for `optim.AdamW`).

Built on first use with the system's C++ compiler against the running torch's headers (about 20
seconds, once per machine and torch version, into the same cache as `kernels`), and loaded with
``torch.ops.load_library``. Where it cannot be built (no C++ compiler, no compiled kernels, or
``MLPMIXER_NODE=0``), `fused` keeps its Python bodies: the same results, slower steps. `status` says
which is in use (``mlpmixer train`` prints it and records it in config.json).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from . import kernels

SOURCES = (Path(__file__).with_name("node.cpp"), Path(__file__).with_name("optim.cpp"))  # one library
FLAGS = ("-O2", "-std=c++17", "-fPIC", "-shared", "-w")
KERNELS = ("layer_norm_f32", "layer_norm_bf16", "layer_norm_backward_f32", "layer_norm_backward_bf16",
           "dropout_bias_f32", "dropout_bias_bf16", "dropout_add_bias_f32", "dropout_add_bias_f32_bf16", "dropout_mul_sum_f32",
           "dropout_mul_sum_f32_bf16", "gelu_bf16", "gelu_backward_bf16", "gelu_backward_sum_bf16", "to_bf16",
           "to_f32")  # node.cpp's order

_ops = None
_status: str | None = None


def ops():
    """``torch.ops.mlpmixer`` with `node.cpp`'s operators, built on first use; None where they cannot be."""
    global _ops, _status
    if _status is None:
        try:
            _ops, _status = _load()
        except (OSError, subprocess.SubprocessError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            _ops, _status = None, f"Python (the C++ node could not be built: {first})"
    return _ops


def status() -> str:
    """Which bodies the residual-MLP node runs here, in words."""
    ops()
    return _status or ""


def _load():
    if os.environ.get("MLPMIXER_NODE", "1") == "0":
        return None, "Python (MLPMIXER_NODE=0)"
    lib = kernels.library()
    if lib is None:
        return None, "Python (the compiled kernels are not available)"
    found = kernels.find_compiler(os.environ.get("CXX", "c++"))
    if found is None:
        return None, "Python (no C++ compiler: install g++ for the C++ node)"
    cxx, compiler = found
    if not _registered():  # a second library registering the same operators would abort the process
        path = kernels.cache_dir() / f"node-{_build_key(compiler)}.so"
        if not path.exists():
            print("mlpmixer: building the C++ residual node and optimiser step for this torch (once per machine, "
                  "about 20 s)", file=sys.stderr, flush=True)
        kernels.load_cached(path, lambda out: [cxx, *FLAGS, *_torch_flags(), "-o", out, *map(str, SOURCES),
                                               *_torch_libs()],
                            lambda built: torch.ops.load_library(str(built)))
    addresses = [ctypes.cast(getattr(lib, f"mlpmixer_{name}"), ctypes.c_void_p).value for name in KERNELS]
    torch.ops.mlpmixer.set_kernels(addresses, *kernels.gelu_tables())
    return torch.ops.mlpmixer, f"C++ ({compiler})"


def _registered() -> bool:
    """Whether this process already holds the operators (a library loaded earlier)."""
    try:
        return hasattr(torch.ops.mlpmixer, "residual_mlp")
    except (AttributeError, RuntimeError):
        return False


def _torch_root() -> Path:
    return Path(torch.__file__).parent


def _torch_flags() -> list[str]:
    include = _torch_root() / "include"
    return [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", f"-I{include}",
            f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}"]


def _torch_libs() -> list[str]:
    lib = _torch_root() / "lib"
    return [f"-L{lib}", f"-Wl,-rpath,{lib}", "-ltorch_cpu", "-lc10"]


def _build_key(compiler: str) -> str:
    """Source, compiler, flags, the processor architecture and the torch it is built against (its version
    and where it lives)."""
    parts = (*(source.read_bytes() for source in SOURCES), compiler.encode(), " ".join(FLAGS).encode(),
             platform.machine().encode(), torch.__version__.encode(), str(_torch_root()).encode(),
             str(torch._C._GLIBCXX_USE_CXX11_ABI).encode())
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
