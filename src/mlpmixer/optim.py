"""AdamW whose step takes the training loop's gradient scaling and clipping with it (issue 17).

Each step `mlpmixer train` multiplies the gradients by world / count (the mean over the global batch),
clips their global norm (``--grad-clip``) and steps AdamW. Written with torch's calls that is
`torch._foreach_norm`, `torch._foreach_mul_` and `torch.optim.AdamW.step`; on the CPU the foreach
calls run tensor by tensor, with a scalar made into a tensor for each, so at the MLM seed
configuration (77 gradients, 466 k values) the scaling and clipping took 0.6 ms and the step 1.0 ms of
a 38 ms step at 2 threads, most of it not arithmetic.

``AdamW.step(grad_multiplier=…, max_norm=…)`` does the same in one C++ operator (`optim.cpp`, built
with the residual node's library by `node`): the squared norm in one loop (float64 sums of float32
blocks), the scaling in one, the step counts, then torch's own fused AdamW kernel per parameter group,
on lists of the state made once (again after `load_state_dict`, `add_param_group` or a step that made
state). The update is torch's (its kernel) and the scaling the same float32 products as
`rescale_gradients`; only the norm is summed differently from torch's float32 sums, so the clip
coefficient can differ from torch's in its last bits. Where the library is not built, where float16's
gradient scaler is at work (``found_inf``), for AMSGrad, ``maximize``, a closure, a tensor learning
rate, parameters off the CPU or not float32, and on the first step (before AdamW has made its state),
it is `rescale_gradients` then torch's own step. State entries replaced by hand, other than through
`load_state_dict`, are not noticed.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from . import node


def rescale_gradients(parameters, scale: float, max_norm: float = 0.0) -> None:
    """Multiply the parameters' gradients by ``scale``, then clip their global norm to ``max_norm`` (when
    not 0) as `torch.nn.utils.clip_grad_norm_` would, both in one pass over the gradients."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    if max_norm:
        norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))) * scale
        scale *= clip_coefficient(norm, max_norm)
    torch._foreach_mul_(grads, scale)


def clip_coefficient(norm: float, max_norm: float) -> float:
    """`torch.nn.utils.clip_grad_norm_`'s factor for a global norm ``norm``: at most 1."""
    return min(1.0, max_norm / (norm + 1e-6))


class AdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` (the same state, state dict and update) whose `step` also scales and clips
    the gradients, in one C++ operator where it is built (see the module)."""

    _lists: _StateLists | None = None  # per instance once made (a copy or unpickled one makes its own)

    @torch.no_grad()
    def step(self, closure=None, *, grad_multiplier: float = 1.0, max_norm: float = 0.0):
        """Multiply the gradients by ``grad_multiplier``, clip their global norm to ``max_norm`` (0: no
        clipping), then one AdamW step; ``closure`` as torch's (it takes the plain path)."""
        lists = self._state_lists() if closure is None else None
        if lists is not None:
            options = [(g["lr"], *g["betas"], g["weight_decay"], g["eps"]) for g in self.param_groups]
            if not any(isinstance(o, Tensor) for group in options for o in group):
                lrs, beta1s, beta2s, weight_decays, epss = (list(column) for column in zip(*options))
                norm = node.ops().adamw_step(*lists.tensors, lists.group_ends, lrs, beta1s, beta2s, weight_decays,
                                             epss, grad_multiplier, max_norm)
                if not math.isnan(norm):
                    return None
                self._lists = None  # the plain step may make state: listed again next time
        rescale_gradients([p for g in self.param_groups for p in g["params"]], grad_multiplier, max_norm)
        return super().step(closure)

    def load_state_dict(self, state_dict):
        self._lists = None
        super().load_state_dict(state_dict)

    def add_param_group(self, param_group):
        self._lists = None
        super().add_param_group(param_group)

    def _state_lists(self) -> _StateLists | None:
        """The operator's lists of parameters and state, made again when the state or the groups changed;
        None where torch's own step must run (see the module)."""
        if (node.ops() is None or getattr(self, "grad_scale", None) is not None
                or getattr(self, "found_inf", None) is not None):
            return None
        if any(not g["fused"] or g["amsgrad"] or g["maximize"] or g["capturable"] or g["differentiable"]
               for g in self.param_groups):
            return None
        if self._lists is None or not self._lists.current(self):
            self._lists = _StateLists(self)
        return self._lists if self._lists.on_cpu else None


class _StateLists:
    """Every group's parameters in order, their first and second moments and step counts (None where a
    parameter has no state yet), and where each group ends."""

    def __init__(self, opt: torch.optim.Optimizer):
        self.state, self.groups = opt.state, [g["params"] for g in opt.param_groups]
        params = [p for group in self.groups for p in group]
        entries = [opt.state.get(p, {}) for p in params]
        self.tensors = (params, *([e.get(key) for e in entries] for key in ("exp_avg", "exp_avg_sq", "step")))
        self.group_ends = list(itertools.accumulate(len(group) for group in self.groups))
        self.on_cpu = all(p.device.type == "cpu" for p in params)  # the operator's loops are CPU loops
        self.sizes = [len(group) for group in self.groups]

    def current(self, opt: torch.optim.Optimizer) -> bool:
        """Whether these lists are still ``opt``'s: the same state, groups and parameter lists."""
        return (opt.state is self.state and len(opt.param_groups) == len(self.groups)
                and all(g["params"] is params and len(params) == size
                        for g, params, size in zip(opt.param_groups, self.groups, self.sizes)))
