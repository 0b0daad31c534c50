"""The seed configuration's masked-LM training step: mlpmixer vs labml-nn's MLP-Mixer MLM.

Both models are the seed experiment's (labml_nn/transformers/mlp_mixer/experiment.py): seq_len 32,
batch 64, d_model 128, 6 pre-norm layers, token-mixing MLP 32 -> 128 -> 32 and channel MLP
128 -> 256 -> 128 with GELU, dropout 0.1, sinusoidal positions, a 67-character vocabulary. One
training step = forward, masked cross-entropy, backward, gradient clipping at 1.0, AdamW
(`common.adamw`: torch's fused CPU kernel) and ``zero_grad(set_to_none=True)``; the same optimiser
and loss for both, so the ratio measures the models.

FLOPs per step (matrix products only; ×3 for forward + the two backward products):
    3 · B · N · [L · (4 · D · D_S + 4 · D · D_C) + 2 · D · V]
(the token MLP multiplies N -> D_S -> N for each of the B·D columns: 4·B·D·N·D_S; the channel MLP
D -> D_C -> D for each of the B·N tokens: 4·B·N·D·D_C; the head 2·B·N·D·V).

The same step with the other token mixers in mlpmixer's encoder (``mlpmixer-fourier``,
``mlpmixer-gmlp``, gMLP's d_ffn = D_C) replaces 4·D·D_S per token by the mixer's own count: FNet's two
FFTs ≈ 5·D·(log2 N + log2 D) (not matrix products), gMLP's 3·D·D_C + N·D_C.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlpmixer import MaskedLanguageModel, MLMConfig, allocator
from mlpmixer.mlm import mask_tokens
from mlpmixer.text import mlm_loss_of

from . import common


@dataclass(frozen=True)
class Seed:
    seq_len: int = 32
    batch: int = 64
    d_model: int = 128
    n_layers: int = 6
    d_ff: int = 256
    tokens_mlp_dim: int = 128
    dropout: float = 0.1
    vocab_size: int = 67

    def flops(self, mixer: str = "mlp") -> float:
        """Matrix-product FLOPs of one training step (see the module docstring)."""
        token_mixing = {"mlp": 4 * self.d_model * self.tokens_mlp_dim,
                        "fourier": 5 * self.d_model * (math.log2(self.seq_len) + math.log2(self.d_model)),
                        "gmlp": 3 * self.d_model * self.d_ff + self.seq_len * self.d_ff}[mixer]
        per_token = self.n_layers * (token_mixing + 4 * self.d_model * self.d_ff)
        per_token += 2 * self.d_model * self.vocab_size
        return 3.0 * self.batch * self.seq_len * per_token


class LabmlMLM(nn.Module):
    """labml_nn.transformers.mlm.experiment.TransformerMLM, restated: that module imports torchvision."""

    def __init__(self, *, encoder: nn.Module, src_embed: nn.Module, generator: nn.Module):
        super().__init__()
        self.generator, self.src_embed, self.encoder = generator, src_embed, encoder

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return self.generator(self.encoder(self.src_embed(x), None)), None


def labml_model(s: Seed) -> nn.Module:
    """labml-nn's MLM with its MLPMixer, assembled as its experiment's configs assemble it."""
    from labml_nn.transformers.feed_forward import FeedForward
    from labml_nn.transformers.mlp_mixer import MLPMixer
    from labml_nn.transformers.models import (Encoder, EmbeddingsWithPositionalEncoding, Generator,
                                              TransformerLayer)

    layer = TransformerLayer(d_model=s.d_model,
                             self_attn=MLPMixer(FeedForward(s.seq_len, s.tokens_mlp_dim, s.dropout, nn.GELU())),
                             feed_forward=FeedForward(s.d_model, s.d_ff, s.dropout, nn.GELU()),
                             dropout_prob=s.dropout)
    return LabmlMLM(encoder=Encoder(layer, s.n_layers),  # Encoder deep-copies the layer n_layers times
                          src_embed=EmbeddingsWithPositionalEncoding(s.d_model, s.vocab_size),
                          generator=Generator(s.vocab_size, s.d_model))


def ours_model(s: Seed, mixer: str = "mlp") -> nn.Module:
    return MaskedLanguageModel(MLMConfig(seq_len=s.seq_len, d_model=s.d_model, n_layers=s.n_layers, d_ff=s.d_ff,
                                         tokens_mlp_dim=s.tokens_mlp_dim, dropout=s.dropout,
                                         vocab_size=s.vocab_size, token_mixer=mixer))


# contender -> token mixer; "mlpmixer-train" is the step `mlpmixer train mlm` runs (`train_step`)
OURS = {"mlpmixer": "mlp", "mlpmixer-train": "mlp", "mlpmixer-fourier": "fourier", "mlpmixer-gmlp": "gmlp"}


def batch(s: Seed, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, s.vocab_size, (s.batch, s.seq_len), generator=g)
    return mask_tokens(ids, mask_id=1, vocab_size=s.vocab_size, special_ids=(0, 1), generator=g)


def floor_step(s: Seed, dtype: torch.dtype | None = None):
    """The step's matrix products alone, at their real shapes, and nothing else: the GEMM-only floor.

    Per layer, the token MLP (Eq. 1, weights from the left over the B·D columns) and the channel MLP
    (Eq. 2, from the right over the B·N tokens), each as its two forward products and the four
    backward ones (the gradients of both weights and of both inputs); then the head's forward product
    and its two backward ones. Outputs are preallocated, so the figure is the products' own time, in
    ``dtype`` (fp32 when None) as autocast would run them.
    """
    dt = dtype or torch.float32
    g = torch.Generator().manual_seed(0)
    n, cols, rows = s.seq_len, s.batch * s.d_model, s.batch * s.seq_len

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(dt)

    products = []  # (a, b, out): out = a @ b

    def mm(a: Tensor, b: Tensor) -> None:
        products.append((a, b, torch.empty(a.shape[0], b.shape[1], dtype=dt)))

    for _ in range(s.n_layers):
        # token mixing: h = W1 (D_S, N) · X (N, B·D); y = W2 (N, D_S) · σ(h) (D_S, B·D)
        w1, x, w2, hid, dy = r(s.tokens_mlp_dim, n), r(n, cols), r(n, s.tokens_mlp_dim), r(s.tokens_mlp_dim, cols), r(n, cols)
        mm(w1, x), mm(w2, hid)                                      # forward
        mm(dy, hid.t()), mm(w2.t(), dy), mm(hid, x.t()), mm(w1.t(), hid)  # dW2, dσ, dW1, dX
        # channel mixing: h = X (B·N, D) · W1ᵀ (D, D_C); y = σ(h) (B·N, D_C) · W2ᵀ (D_C, D)
        x, w1, w2, hid, dy = r(rows, s.d_model), r(s.d_ff, s.d_model), r(s.d_model, s.d_ff), r(rows, s.d_ff), r(rows, s.d_model)
        mm(x, w1.t()), mm(hid, w2.t())
        mm(dy.t(), hid), mm(dy, w2), mm(hid.t(), x), mm(hid, w1)
    x, w, dy = r(rows, s.d_model), r(s.vocab_size, s.d_model), r(rows, s.vocab_size)  # the head
    mm(x, w.t()), mm(dy.t(), x), mm(dy, w)

    def step() -> None:
        for a, b, out in products:
            torch.mm(a, b, out=out)

    return step


def make_step(name: str, s: Seed, dtype: torch.dtype | None = None, malloc: bool = True):
    """A closure running one training step of contender ``name`` (one of ``OURS``, "labml", or "floor":
    `floor_step`; "mlpmixer-train" is `train_step`, with its malloc setting when ``malloc``). The floor
    gets the same malloc setting (its tensors then sit on the same transparent huge pages, which speed
    its products up too): the floor stays the fastest the products run here."""
    if name == "floor":
        if malloc:
            allocator.keep_freed_memory()
        return floor_step(s, dtype)
    if name == "mlpmixer-train":
        return train_step(s, dtype, malloc)
    torch.manual_seed(0)
    model = (labml_model(s) if name == "labml" else ours_model(s, OURS[name])).train()
    opt = common.adamw(model.parameters())
    inputs, labels = batch(s)
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)

    if name != "labml":
        def loss_fn() -> Tensor:
            return mlm_loss_of(model, inputs, labels)[0]
    else:
        inputs_sf, labels_sf = inputs.t().contiguous(), labels.t().contiguous()  # labml is sequence-first

        def loss_fn() -> Tensor:
            logits, _ = model(inputs_sf)  # (N, B, V)
            return F.cross_entropy(logits.reshape(-1, s.vocab_size).float(), labels_sf.reshape(-1))

    def step() -> None:
        with autocast:
            loss = loss_fn()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def train_step(s: Seed, dtype: torch.dtype | None = None, malloc: bool = True):
    """A closure running one step of `mlpmixer train mlm` at the seed configuration, as the command line
    runs it: `mlpmixer.train._Loop.train_step` on a fresh global batch (windows sampled from a synthetic
    text and masked, as `MLMTask.batch` does each step), its optimiser (`train.make_optimizer`: AdamW,
    lr 1e-4, gradient clipping at 1.0), its autocast and, with ``malloc``, the malloc setting `mlpmixer
    train` makes (`mlpmixer.allocator.keep_freed_memory`: process-wide, so not where contenders share a
    process). The run folder it would write to is never created."""
    import tempfile
    from pathlib import Path

    from mlpmixer import train
    from mlpmixer.data.tokenizer import CharTokenizer
    from mlpmixer.text_train import MLMTask

    if malloc:
        allocator.keep_freed_memory()
    torch.manual_seed(0)
    model = ours_model(s).train()
    g = torch.Generator().manual_seed(0)
    tok = CharTokenizer([chr(33 + i) for i in range(s.vocab_size - 2)])  # [PAD], [MASK] and 65 characters
    ids = torch.randint(2, s.vocab_size, (100_000,), generator=g)
    task = MLMTask(ids, ids[:4 * s.seq_len], tok, s.seq_len, s.batch, 0, torch.device("cpu"))
    config = train.TrainConfig(batch_size=s.batch, optimizer="adamw", lr=1e-4, warmup=0, grad_clip=1.0,
                               precision="fp32" if dtype is None else "bf16", device="cpu",
                               threads=torch.get_num_threads())
    out = Path(tempfile.gettempdir()) / "mlpmixer-benchmark-never-written"
    loop = train._Loop(model, task, config, train.distributed.Dist(), *train.make_optimizer(model, config, s.d_model),
                       out, quiet=True, tensorboard=False)
    step_index = iter(range(1 << 62))

    def step() -> None:
        i = next(step_index)
        loop.train_step(task.batch(i, g), g, i)

    return step


CONTENDERS = ("mlpmixer", "mlpmixer-train", "labml", "mlpmixer-fourier", "mlpmixer-gmlp")


def run(rounds: int, warmup: int, reps: int, threads: int = 2, dtype: torch.dtype | None = None,
        interleaved: bool = False, contenders: tuple[str, ...] = CONTENDERS, memory: bool = True) -> str:
    """The MLM table: each contender, the GEMM-only floor and the 2048² matmul peak timed alone in their
    own processes (`common.time_alone`), or, ``interleaved``, alternately in this one (the old method)."""
    s = Seed()
    try:
        import labml_nn  # noqa: F401
        names, skipped = contenders, ""
    except ImportError:
        names = tuple(n for n in contenders if n != "labml")
        skipped = "\nlabml-nn is not installed (pip install -e '.[bench]'); reference skipped.\n"
    label = "bf16 autocast" if dtype is not None else "fp32"
    extra = ("bf16",) if dtype is not None else ()
    jobs = {n: (n, *extra) for n in ("peak", "floor", *names)}
    if interleaved:
        torch.set_num_threads(threads)
        fns = {n: make_step(n, s, dtype, malloc=False) if n != "peak" else common.matmul(dtype=dtype or torch.float32)[0]
               for n in jobs}
        med = common.time_in_process(fns, warmup, rounds * reps)
        method = (f"all in this process, alternating, {warmup} warm-up + {rounds * reps} timed rounds, medians; "
                  f"mlpmixer-train without its malloc setting (process-wide)")
    else:
        med = common.time_alone("benchmarks.mlm", jobs, rounds=rounds, warmup=warmup, reps=reps, threads=threads)
        method = (f"each alone in its own process, {rounds} alternating rounds of {warmup} warm-up + {reps} timed "
                  f"steps; median of the rounds' medians, their range in brackets")
    failed = {n: m for n, m in med.items() if isinstance(m, str)}
    if "peak" in failed or "floor" in failed:
        return f"### MLM: the peak or the floor failed: {failed}"
    peak, floor = common.PEAK_FLOPS / med["peak"].median, med["floor"].median
    memory_of = {n: common.peak_memory("benchmarks.mlm", n, *extra, threads=threads) if memory else {}
                 for n in names}
    ref = med.get("labml")
    rows = []
    for n in ("floor", *names):
        t = med[n]
        if isinstance(t, str):
            rows.append([n, t, "", "", "", "", "", ""])
            continue
        achieved = s.flops(OURS.get(n, "mlp")) / t.median
        mem = memory_of.get(n, {})
        rows.append(["GEMM-only floor" if n == "floor" else n, f"{t.median * 1e3:.1f} ({t.spread()})",
                     "1.00×" if n == "floor" else f"**{t.median / floor:.2f}×**" if OURS.get(n, "mlp") == "mlp" else
                     "—",  # the floor is the mlp encoder's products; the other mixers' differ
                     f"{s.batch * s.seq_len / t.median:,.0f}",
                     f"{ref.median / t.median:.2f}×" if isinstance(ref, common.Timing) and n != "floor" else "—",
                     common.gflops(achieved), f"{achieved / peak:.0%}",
                     common.mib(mem["peak_bytes"]) if "peak_bytes" in mem else mem.get("error", "—")])
    head = (f"### MLM seed configuration, {label} training step, {threads} thread{'s' * (threads > 1)}\n\n"
            f"Timing: {method}. FLOPs/step {s.flops() / 1e9:.2f} G (matrix products); {label} 2048² matmul peak "
            f"{common.gflops(peak)} GFLOP/s. × floor: the step's time over its matrix products' alone (the token-mixing MLP's; other mixers' products differ, so no ratio).\n{skipped}\n")
    return head + common.table(["model", "ms/step", "× floor", "tokens/s", "vs labml", "GFLOP/s", "of peak",
                                "peak memory"], rows)


def _step(name: str, bf16: bool):
    if name == "peak":
        return common.matmul(dtype=torch.bfloat16 if bf16 else torch.float32)[0]
    return make_step(name, Seed(), torch.bfloat16 if bf16 else None)


def _memory_child(name: str, *rest: str) -> None:
    common.warm_libraries()
    baseline = common.rest_kib()
    common.child_report(make_step(name, Seed(), torch.bfloat16 if "bf16" in rest else None), baseline)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The MLM table alone; python -m benchmarks.run runs every section.")
    parser.add_argument("--memory-child", nargs="+")
    parser.add_argument("--time-child", nargs="+")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(*args.memory_child)
    elif args.time_child:
        common.child_time(_step(args.time_child[0], "bf16" in args.time_child[1:]), args.warmup, args.reps)
    else:
        print(run(args.rounds, args.warmup, args.reps, args.threads))
