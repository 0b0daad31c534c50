"""Dropout masks made where they are used: a small C library, compiled on first use, with a torch fallback.

On the CPU the MLM seed step spent more time on dropout than on anything but its matrix products
(issue 17): torch's generator (MT19937) draws bits serially, and a mask then costs several passes over
memory (bits, comparison, conversion, the multiply), plus a stored mask for backward. Here each
dropout call draws one 64-bit key from torch's default generator (so ``torch.manual_seed``,
``fork_rng`` and checkpointed RNG states see one draw), and element e's bits are a function of (key, e)
alone: lane e % 4 of SplitMix64's output at position e // 4 + 1 of the stream starting at the key (a
counter-based generator). So any thread can make any element's bits, the result does not depend on
the thread count, one pass writes the dropped-and-biased pre-activation (`dropout_bias`), the
residual sum (`dropout_add`) or the masked gradient (`dropout_mul`), and backward makes the mask
again from the key instead of keeping it. The same library holds GELU for bfloat16 by table lookup
(`gelu_bf16`, `gelu_backward_bf16_`: a bfloat16 has 65,536 values, and the tables hold torch's own
results for each, so the lookups equal torch's GELU bit for bit at a fraction of its time).

`kernels.c` does this in C with OpenMP (torch's own OpenMP runtime, so no second thread pool),
compiled once per machine with the system's C compiler into the user cache
(``$MLPMIXER_CACHE_DIR``, else ``$XDG_CACHE_HOME/mlpmixer``, else ``~/.cache/mlpmixer``), for
float32 and bfloat16. `lanes` computes the same bits with torch operations: the reference the tests
hold the C code to. Without a compiler, with ``MLPMIXER_KERNELS=0``, or for other dtypes,
`layers.Dropout` keeps its torch implementation (torch's generator, a stored mask: the same
distribution, other draws, and 10–20 % slower steps), because the torch form of this generator
is slower still. `status` says which is in use (``mlpmixer train`` records it in config.json).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared", "-std=c11")
LIBS = ("-lm",)  # after the source: the library names its own libm (sqrtf) instead of borrowing the process's
DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}
CHUNK_ROWS = 64  # kernels.c's CHUNK: rows whose partial sums the thread-count independent reductions keep
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB

_lib: ctypes.CDLL | None = None
_status: str | None = None


def _signed(v: int) -> int:
    """A 64-bit pattern as torch's int64."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def new_key() -> int:
    """One 64-bit key (0 … 2^64 − 1) from torch's default CPU generator: one draw per dropout call."""
    return int(torch.empty((), dtype=torch.int64).random_(torch.iinfo(torch.int64).min, None)) & ((1 << 64) - 1)


def lanes(key: int, n: int) -> Tensor:
    """The uniform 16-bit integers (0 … 65535, int32) of elements 0 … n − 1 under ``key``, in torch.

    The reference for `kernels.c`: word w = SplitMix64(key + (w + 1)·φ), element e = 16-bit lane e % 4
    of word e // 4 in memory order. int64 products wrap as in C; shifts are made logical by masking.
    """
    z = torch.arange(1, (n + 3) // 4 + 1, dtype=torch.int64).mul_(_signed(_GOLDEN)).add_(_signed(key))
    for shift, factor in ((30, _MIX1), (27, _MIX2), (31, None)):
        z.bitwise_xor_((z >> shift) & ((1 << (64 - shift)) - 1))
        if factor is not None:
            z.mul_(_signed(factor))
    return z.view(torch.int16)[:n].to(torch.int32).bitwise_and_(0xFFFF)


def status() -> str:
    """Which implementation dropout uses here, in words (after the first call to `library`)."""
    library()
    return _status or ""


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None where they cannot be (see `status`)."""
    global _lib, _status
    if _status is None:
        try:
            _lib, _status = _load()
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            _lib, _status = None, f"torch (the kernels could not be built: {str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return _lib


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("MLPMIXER_KERNELS", "1") == "0":
        return None, "torch (MLPMIXER_KERNELS=0)"
    if sys.byteorder != "little" or platform.system() != "Linux":
        return None, f"torch (the kernels are built on little-endian Linux only, not {platform.system()})"
    found = find_compiler(os.environ.get("CC", "cc"))
    if found is None:
        return None, "torch (no C compiler: install gcc for mlpmixer's compiled dropout kernels)"
    cc, compiler = found
    lib = load_cached(cache_dir() / f"kernels-{_build_key(compiler)}.so",
                      lambda out: [cc, *FLAGS, "-o", out, str(SOURCE), *LIBS], lambda path: ctypes.CDLL(str(path)))
    _declare(lib)
    return lib, f"compiled kernels ({compiler}, {' '.join(FLAGS[:2])})"


def cache_dir() -> Path:
    """Where the compiled builds live (`kernels.c`'s, `node.cpp`'s): the first writable of
    ``$MLPMIXER_CACHE_DIR`` (else ``$XDG_CACHE_HOME/mlpmixer``, else ``~/.cache/mlpmixer``) and a per-user temporary folder."""
    base = os.environ.get("MLPMIXER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mlpmixer")
    for d in (Path(base), Path(tempfile.gettempdir()) / f"mlpmixer-{os.getuid()}"):
        try:
            d.mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    raise OSError(f"no writable cache directory for the compiled kernels (tried {base}); set MLPMIXER_CACHE_DIR")


def _build_key(compiler: str) -> str:
    """Source, compiler, flags, torch's version and this CPU's instruction sets: -march=native code is
    for this machine only, so a cache shared between machines holds one build per CPU type."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    parts = (SOURCE.read_bytes(), compiler.encode(), " ".join(FLAGS + LIBS).encode(), platform.machine().encode(),
             flags.encode(), torch.__version__.encode())
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def find_compiler(tool: str) -> tuple[str, str] | None:
    """The compiler ``tool`` names (a command on the PATH, or a path): its path and the first line of its
    ``--version``, or None where there is none."""
    path = shutil.which(tool)
    if path is None:
        return None
    version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()
    return path, version[0] if version else path


def load_cached(path: Path, command, load):
    """``load(path)``: our cached build at ``path``, made first (`build`, ``command``) where it is missing;
    one that does not load (cut short, another machine's) is built again, once."""
    if not path.exists():
        build(path, command)
    try:
        return load(path)
    except OSError:
        path.unlink(missing_ok=True)
        build(path, command)
        return load(path)


def build(path: Path, command) -> None:
    """Run ``command(out)`` (a compiler's argument list writing ``out``) into a temporary name beside
    ``path`` and rename it there: processes building at once (torchrun) each write their own file, and a
    reader never sees half of one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        args = command(tmp)
        done = subprocess.run(args, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise OSError(f"{args[0]} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> None:
    """The C signatures (`kernels.c`), so ctypes converts the Python arguments exactly."""
    p, i64, u64, u32, f, i = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float,
                              ctypes.c_int)
    signatures = {"mlpmixer_lanes": [p, i64, u64]}
    for name in DTYPES.values():
        signatures[f"mlpmixer_dropout_bias_{name}"] = [p, p, i64, i64, i, u64, u32, f, i]
        signatures[f"mlpmixer_layer_norm_{name}"] = [p, p, p, p, p, p, i64, i64, f, i]
        signatures[f"mlpmixer_layer_norm_backward_{name}"] = [p, p, p, p, p, p, p, p, p, p, i64, i64, i]
    for name in ("f32", "bf16", "f32_bf16"):
        signatures[f"mlpmixer_dropout_add_{name}"] = [p, p, p, i64, u64, u32, f, i]
        signatures[f"mlpmixer_dropout_mul_{name}"] = [p, p, i64, u64, u32, f, i]
    for name in ("f32", "f32_bf16"):
        signatures[f"mlpmixer_dropout_mul_sum_{name}"] = [p, p, p, p, i64, i64, i, u64, u32, f, i]
        signatures[f"mlpmixer_dropout_add_bias_{name}"] = [p, p, p, p, i64, i64, i, u64, u32, f, i]
    signatures["mlpmixer_embed_f32"] = [p, p, p, p, i64, i64, i64, i64, f, i]
    signatures["mlpmixer_embed_backward_f32"] = [p, p, p, p, p, i64, i64, i64, i64, f, i]
    signatures["mlpmixer_to_bf16"] = signatures["mlpmixer_to_f32"] = [p, p, i64, f, i]
    signatures["mlpmixer_gelu_bf16"] = [p, p, i64, p, i]
    signatures["mlpmixer_gelu_backward_bf16"] = [p, p, p, i64, p, i]
    signatures["mlpmixer_gelu_backward_sum_bf16"] = [p, p, p, p, p, i64, i64, i, p, i]
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    lib.mlpmixer_embed_f32.restype = ctypes.c_int64


def supports(*tensors: Tensor) -> bool:
    """Whether the compiled kernels exist here and take these tensors (CPU, float32 or bfloat16)."""
    for t in tensors:  # a loop, not all(generator): asked a few times per layer and step
        if t.device.type != "cpu" or not supports_dtype(t.dtype):
            return False
    return True


def supports_dtype(dtype: torch.dtype) -> bool:
    """Whether the compiled kernels exist here and take CPU tensors of ``dtype``."""
    return dtype in DTYPES and library() is not None


def compiled_lanes(key: int, n: int) -> Tensor:
    """`lanes` as the compiled library makes them (int32): for tests."""
    out = torch.empty(n, dtype=torch.int16)
    _need().mlpmixer_lanes(out.data_ptr(), n, key)
    return out.to(torch.int32).bitwise_and_(0xFFFF)


def _need() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"mlpmixer's compiled kernels are not available: {_status}")
    return lib


def dropout_bias(bias: Tensor, rows: int, cols: int, per_row: bool, key: int, threshold: int,
                 dropped: float) -> Tensor:
    """(rows, cols): ``bias`` (one value per row if ``per_row``, else per column) plus ``dropped`` at
    the elements whose lane is below ``threshold``."""
    bias = bias.contiguous()
    out = torch.empty((rows, cols), dtype=bias.dtype)
    getattr(_need(), f"mlpmixer_dropout_bias_{DTYPES[bias.dtype]}")(
        out.data_ptr(), bias.data_ptr(), rows, cols, int(per_row), key, threshold, dropped, torch.get_num_threads())
    return out


def dropout_add(x: Tensor, branch: Tensor, key: int, threshold: int, scale: float) -> Tensor:
    """``x + branch · scale`` where an element is kept, ``x`` where dropped (same shapes; ``branch`` of
    x's dtype, or bfloat16 beside a float32 ``x``)."""
    x, branch = x.contiguous(), branch.contiguous()
    pair = DTYPES[x.dtype] + ("" if branch.dtype == x.dtype else "_" + DTYPES[branch.dtype])
    out = torch.empty_like(x)
    getattr(_need(), f"mlpmixer_dropout_add_{pair}")(out.data_ptr(), x.data_ptr(), branch.data_ptr(), x.numel(),
                                                     key, threshold, scale, torch.get_num_threads())
    return out


def dropout_add_bias(x: Tensor, branch: Tensor, bias: Tensor, per_row: bool, key: int, threshold: int,
                     scale: float) -> Tensor:
    """``x + (branch + bias) · scale`` where an element is kept, ``x`` where dropped: a float32 ``x``, its
    ``branch`` seen as (rows, cols) (float32, or bfloat16 beside its bfloat16 ``bias``), ``bias`` one value per
    row (``per_row``) or per column, added in float32. ``threshold`` 0 drops nothing (and draws nothing).
    The same mask as `dropout_add` under ``key``."""
    x, branch, bias = x.contiguous(), branch.contiguous(), bias.contiguous()
    rows, cols = branch.shape if branch.dim() == 2 else (0, 0)
    if (x.dtype != torch.float32 or branch.dtype not in DTYPES or branch.dim() != 2 or branch.numel() != x.numel()
            or bias.dtype != branch.dtype or bias.numel() != (rows if per_row else cols)):
        raise ValueError(f"dropout_add_bias takes a float32 x, a 2-D float32 or bfloat16 branch of x's size and a "
                         f"bias of one value per {'row' if per_row else 'column'} in the branch's dtype; got x "
                         f"{x.dtype} {tuple(x.shape)}, branch {branch.dtype} {tuple(branch.shape)}, bias "
                         f"{bias.dtype} {tuple(bias.shape)}")
    out = torch.empty_like(x)
    getattr(_need(), f"mlpmixer_dropout_add_bias_{'f32' if branch.dtype == torch.float32 else 'f32_bf16'}")(
        out.data_ptr(), x.data_ptr(), branch.data_ptr(), bias.data_ptr(), rows, cols, int(per_row), key, threshold,
        scale, torch.get_num_threads())
    return out


def dropout_mul(t: Tensor, key: int, threshold: int, scale: float, dtype: torch.dtype | None = None) -> Tensor:
    """``t · scale`` where an element is kept, 0 where dropped; in ``dtype`` (t's when None; bfloat16
    beside a float32 ``t``), rounded once."""
    t = t.contiguous()
    out = torch.empty_like(t, dtype=dtype)
    pair = DTYPES[t.dtype] + ("" if out.dtype == t.dtype else "_" + DTYPES[out.dtype])
    getattr(_need(), f"mlpmixer_dropout_mul_{pair}")(out.data_ptr(), t.data_ptr(), t.numel(), key,
                                                     threshold, scale, torch.get_num_threads())
    return out


def dropout_mul_sum(t: Tensor, rows: int, cols: int, per_row: bool, key: int, threshold: int, scale: float,
                    dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """`dropout_mul` of a contiguous float32 ``t`` seen as (rows, cols) (cols a multiple of 16), into
    ``dtype`` (float32 or bfloat16), and the float32 sums of the result over each row (``per_row``) or
    column, in the same pass. ``threshold`` 0 drops nothing (``t * scale`` rounded to ``dtype``)."""
    t = t.contiguous()
    _need_multiple_of_16("dropout_mul_sum", cols)
    out = torch.empty((rows, cols), dtype=dtype)
    sums = torch.empty(rows if per_row else cols)
    part = torch.empty(0 if per_row else -(-rows // CHUNK_ROWS) * cols)  # per-chunk column sums
    getattr(_need(), f"mlpmixer_dropout_mul_sum_{'f32_bf16' if dtype == torch.bfloat16 else 'f32'}")(
        out.data_ptr(), sums.data_ptr(), part.data_ptr(), t.data_ptr(), rows, cols, int(per_row), key, threshold,
        scale, torch.get_num_threads())
    return out, sums


def _need_multiple_of_16(name: str, width: int) -> None:
    """The vectorised kernels take rows of whole 16-float vectors."""
    if width % 16:
        raise ValueError(f"kernels.{name} needs rows of a multiple of 16 values, got {width}")


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
               dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm over the last axis of a float32 ``x`` (weight and bias float32), the result in ``dtype``
    (float32 or bfloat16); also each row's mean and 1/√(var + eps), for `layer_norm_backward`."""
    d = x.shape[-1]
    _need_multiple_of_16("layer_norm", d)
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()  # held while the kernel runs
    rows = x.numel() // d
    y = torch.empty(x.shape, dtype=dtype)
    mean, rstd = torch.empty(rows), torch.empty(rows)
    getattr(_need(), f"mlpmixer_layer_norm_{DTYPES[dtype]}")(
        y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), x.data_ptr(), weight.data_ptr(), bias.data_ptr(), rows, d,
        eps, torch.get_num_threads())
    return y, mean, rstd


def layer_norm_backward(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor,
                        residual: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of `layer_norm`'s x, weight and bias from its output's ``dy`` (float32 or
    bfloat16); ``residual`` (float32, x's shape), when given, is added to x's (the gradient that reaches
    x around the norm, in the same pass)."""
    d = x.shape[-1]
    _need_multiple_of_16("layer_norm_backward", d)
    rows = x.numel() // d
    dy, x, weight = dy.contiguous(), x.contiguous(), weight.contiguous()  # held while the kernel runs
    residual = residual.contiguous() if residual is not None else None
    dx, dw, db = torch.empty(x.shape), torch.empty(d), torch.empty(d)
    part = torch.empty(-(-rows // CHUNK_ROWS), 2, d)  # per-chunk sums of the weight and bias gradients
    getattr(_need(), f"mlpmixer_layer_norm_backward_{DTYPES[dy.dtype]}")(
        dx.data_ptr(), dw.data_ptr(), db.data_ptr(), part.data_ptr(), dy.data_ptr(),
        residual.data_ptr() if residual is not None else None, x.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
        weight.data_ptr(), rows, d, torch.get_num_threads())
    return dx, dw, db


_gelu_tables: tuple[Tensor, Tensor] | None = None


def to_bf16(t: Tensor, scale: float = 1.0) -> Tensor:
    """A float32 tensor in bfloat16, rounded as ``t.to(torch.bfloat16)``, and then (``scale`` != 1) times
    ``scale`` rounded as torch's bfloat16 ``t * scale``: the same bits in one pass (`node.cpp`'s casts)."""
    if t.dtype != torch.float32:
        raise ValueError(f"to_bf16 takes a float32 tensor, got {t.dtype}")
    t = t.contiguous()
    out = torch.empty_like(t, dtype=torch.bfloat16)
    _need().mlpmixer_to_bf16(out.data_ptr(), t.data_ptr(), t.numel(), scale, torch.get_num_threads())
    return out


def to_f32(t: Tensor, scale: float = 1.0) -> Tensor:
    """A bfloat16 tensor in float32 (exact), after (``scale`` != 1) the bfloat16 product ``t * scale``."""
    if t.dtype != torch.bfloat16:
        raise ValueError(f"to_f32 takes a bfloat16 tensor, got {t.dtype}")
    t = t.contiguous()
    out = torch.empty_like(t, dtype=torch.float32)
    _need().mlpmixer_to_f32(out.data_ptr(), t.data_ptr(), t.numel(), scale, torch.get_num_threads())
    return out


def gelu_tables() -> tuple[Tensor, Tensor]:
    """For every bfloat16 value (by its 16 bits): torch's bfloat16 GELU of it (int32, for the C gather)
    and torch's float32 GELU slope at it — made by torch itself, so the lookups give torch's results."""
    global _gelu_tables
    if _gelu_tables is None:
        every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
        value = torch.nn.functional.gelu(every).view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF)
        slope = torch.ops.aten.gelu_backward(torch.ones(1 << 16), every.float())
        _gelu_tables = value.contiguous(), slope.contiguous()
    return _gelu_tables


def gelu_bf16(h: Tensor) -> Tensor:
    """torch's exact GELU of a bfloat16 tensor, bit for bit, by one table lookup per element."""
    h = h.contiguous()
    out = torch.empty_like(h)
    _need().mlpmixer_gelu_bf16(out.data_ptr(), h.data_ptr(), h.numel(), gelu_tables()[0].data_ptr(),
                               torch.get_num_threads())
    return out


def gelu_backward_bf16_(dy: Tensor, h: Tensor) -> Tensor:
    """torch's ``gelu_backward(dy, h)`` for bfloat16, bit for bit, written over ``dy`` (contiguous)."""
    h = h.contiguous()
    _need().mlpmixer_gelu_backward_bf16(dy.data_ptr(), dy.data_ptr(), h.data_ptr(), h.numel(),
                                        gelu_tables()[1].data_ptr(), torch.get_num_threads())
    return dy


def gelu_backward_sum_bf16_(dy: Tensor, h: Tensor, per_row: bool) -> tuple[Tensor, Tensor]:
    """`gelu_backward_bf16_` on a contiguous (rows, cols) ``dy`` (cols a multiple of 16), and the float32
    sums of its result over each row (``per_row``) or column: a hidden bias's gradient, in the same pass."""
    h = h.contiguous()
    rows, cols = dy.shape
    _need_multiple_of_16("gelu_backward_sum_bf16_", cols)
    sums = torch.empty(rows if per_row else cols)
    part = torch.empty(0 if per_row else -(-rows // CHUNK_ROWS) * cols)  # per-chunk column sums
    _need().mlpmixer_gelu_backward_sum_bf16(dy.data_ptr(), sums.data_ptr(), part.data_ptr(), dy.data_ptr(),
                                            h.data_ptr(), rows, cols, int(per_row), gelu_tables()[1].data_ptr(),
                                            torch.get_num_threads())
    return dy, sums


def embed(ids: Tensor, table: Tensor, scale: float, positions: Tensor | None) -> Tensor:
    """Sequence-first ``table[ids.t()] · scale (+ positions[:N, None])`` for int64 ``ids`` (B, N) and a float32
    ``table`` (V, D): (N, B, D) in one pass, the same bits as torch's embedding, mul and add."""
    ids, table = ids.contiguous(), table.contiguous()
    (b, n), (vocab, d) = ids.shape, table.shape
    pos = None if positions is None else positions[:n].contiguous()
    if pos is not None and pos.shape != (n, d):  # the kernel reads N rows of D positions
        raise ValueError(f"embed needs {n} positions of width {d}, not a table of shape {tuple(positions.shape)}")
    out = torch.empty((n, b, d), dtype=table.dtype)
    bad = _need().mlpmixer_embed_f32(out.data_ptr(), ids.data_ptr(), table.data_ptr(),
                                     None if pos is None else pos.data_ptr(), b, n, d, vocab, scale,
                                     torch.get_num_threads())
    if bad >= 0:
        raise IndexError(f"token id {int(ids.view(-1)[bad])} is out of range for an embedding of {vocab} ids")
    return out


def embed_backward(dout: Tensor, ids: Tensor, vocab: int, scale: float) -> Tensor:
    """The table's gradient of `embed` from ``dout`` (N, B, D): each id's rows times ``scale``, summed in
    row order (torch's embedding backward, bit for bit)."""
    dout, ids = dout.contiguous(), ids.contiguous()
    b, n = ids.shape
    d = dout.shape[-1]
    dtable = torch.empty((vocab, d), dtype=dout.dtype)
    order, start = torch.empty(b * n, dtype=torch.int64), torch.empty(2 * vocab + 1, dtype=torch.int64)
    _need().mlpmixer_embed_backward_f32(dtable.data_ptr(), order.data_ptr(), start.data_ptr(), dout.data_ptr(),
                                        ids.data_ptr(), b, n, d, vocab, scale, torch.get_num_threads())
    return dtable

