"""The paper's image classifier (Tolstikhin et al., 2021, arXiv 2105.01601, Fig. 1 and Table 1).

    x (B, in_chans, H, W) --stem--> X (B, S, C)        per-patch linear embedding, S = HW / P²
    X --num_blocks x MixerBlock--> (B, S, C)          token mixing (Eq. 1), then channel mixing (Eq. 2)
    --LayerNorm, mean over S--> (B, C) --head--> logits (B, num_classes)

Module names are timm's (``stem.proj``, ``blocks.{i}.norm1|mlp_tokens|norm2|mlp_channels``, ``norm``,
``head``), so a timm ``MlpMixer`` state dict loads with ``load_state_dict`` and no renaming.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import checkpoints
from .errors import unknown_choice
from .layers import MixerBlock, PatchEmbed, TokenMixingMlp

GELU_APPROXIMATIONS = ("none", "tanh")
LAYER_NORM_EPS = 1e-6  # the official code's (Flax's) LayerNorm epsilon


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """Shape of an MLP-Mixer image classifier; field names follow the official JAX code."""

    patch_size: int
    """Side P of the square patches; the stem is a Conv2d with kernel = stride = P."""
    hidden_dim: int
    """Channels per token, C."""
    tokens_mlp_dim: int
    """Hidden width of the token-mixing MLP, D_S."""
    channels_mlp_dim: int
    """Hidden width of the channel-mixing MLP, D_C."""
    num_blocks: int
    """Number of Mixer blocks."""
    num_classes: int = 1000
    """Outputs of the linear head (0: no head, forward returns pooled features)."""
    img_size: int | tuple[int, int] = 224
    """Input side, or (H, W); each must be divisible by patch_size."""
    in_chans: int = 3
    """Input image channels."""
    dropout: float = 0.0
    """Dropout in the MLPs' hidden layers and on each residual branch."""
    drop_path: float = 0.0
    """Stochastic-depth rate: probability of dropping a block's residual branches (timm's drop_path_rate)."""
    gelu_approximate: str = "none"
    """GELU form: "none" (exact, erf) or "tanh" (Flax's default nn.gelu, for official checkpoints)."""

    def __post_init__(self) -> None:
        if isinstance(self.img_size, list):  # JSON has no tuples
            object.__setattr__(self, "img_size", tuple(self.img_size))
        for name in ("patch_size", "hidden_dim", "tokens_mlp_dim", "channels_mlp_dim", "num_blocks", "in_chans"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {self.num_classes!r}")
        h, w = self.grid_size_of(self.img_size)
        if h <= 0 or w <= 0:
            raise ValueError(f"img_size {self.img_size!r} must be at least one patch of {self.patch_size}")
        for name in ("dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.gelu_approximate not in GELU_APPROXIMATIONS:
            raise ValueError(f"unknown gelu_approximate {self.gelu_approximate!r}; choose one of "
                             f"{', '.join(GELU_APPROXIMATIONS)}")

    def grid_size_of(self, img_size: int | tuple[int, int]) -> tuple[int, int]:
        """Patches along (H, W) for an input of ``img_size``; a clear error when P does not divide it."""
        hw = to_hw(img_size)
        if any(side % self.patch_size for side in hw):
            raise ValueError(f"image size {hw[0]}x{hw[1]} is not divisible by the patch size {self.patch_size}; "
                             f"use a multiple of {self.patch_size} (e.g. --img-size "
                             f"{max(1, round(hw[0] / self.patch_size)) * self.patch_size})")
        return hw[0] // self.patch_size, hw[1] // self.patch_size

    @property
    def image_hw(self) -> tuple[int, int]:
        return to_hw(self.img_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.grid_size_of(self.img_size)

    @property
    def num_patches(self) -> int:
        """The sequence length S of the token-mixing MLP."""
        h, w = self.grid_size
        return h * w

    @property
    def activation(self) -> str:
        """The `layers.activation_fn` name of this GELU."""
        return "gelu" if self.gelu_approximate == "none" else "gelu_tanh"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_name(cls, name: str, **overrides) -> VisionConfig:
        """A preset (see `list_models`) with some fields replaced."""
        if name not in PRESETS:
            raise unknown_choice("model", name, PRESETS)
        return cls(**{**PRESETS[name], **overrides})


def to_hw(img_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(img_size, int) and not isinstance(img_size, bool):
        return img_size, img_size
    if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and all(isinstance(s, int) for s in img_size):
        return int(img_size[0]), int(img_size[1])
    raise ValueError(f"img_size must be an integer or a pair (H, W) of integers, got {img_size!r}")


def _table1(patch: int, hidden: int, tokens: int, channels: int, blocks: int) -> dict:
    return dict(patch_size=patch, hidden_dim=hidden, tokens_mlp_dim=tokens, channels_mlp_dim=channels,
                num_blocks=blocks, img_size=224)


_DIGITS = dict(num_classes=10, img_size=8, in_chans=1)

PRESETS: dict[str, dict] = {
    # The paper's Table 1, at 224x224 with 1000 classes.
    "mixer_s32_224": _table1(32, 512, 256, 2048, 8),
    "mixer_s16_224": _table1(16, 512, 256, 2048, 8),
    "mixer_b32_224": _table1(32, 768, 384, 3072, 12),
    "mixer_b16_224": _table1(16, 768, 384, 3072, 12),
    "mixer_l32_224": _table1(32, 1024, 512, 4096, 24),
    "mixer_l16_224": _table1(16, 1024, 512, 4096, 24),
    "mixer_h14_224": _table1(14, 1280, 640, 5120, 32),
    # Sized for scikit-learn's 8x8 digits (one channel, 10 classes): 2x2 patches, S = 16 tokens.
    "mixer_tiny_digits": dict(patch_size=2, hidden_dim=64, tokens_mlp_dim=32, channels_mlp_dim=256, num_blocks=4,
                              dropout=0.1, **_DIGITS),
    "mixer_small_digits": dict(patch_size=1, hidden_dim=128, tokens_mlp_dim=64, channels_mlp_dim=512, num_blocks=6,
                               dropout=0.1, **_DIGITS),
}


def list_models() -> list[str]:
    """Names accepted by `create_model` and `VisionConfig.from_name`."""
    return list(PRESETS)


def create_model(name: str, **overrides) -> MlpMixer:
    """A freshly initialised preset, e.g. ``create_model("mixer_b16_224", num_classes=10)``."""
    return MlpMixer(VisionConfig.from_name(name, **overrides))


class MlpMixer(nn.Module):
    """Stem, Mixer blocks, LayerNorm, global average pooling over tokens, linear head."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        c = config.hidden_dim
        self.stem = PatchEmbed(config.patch_size, config.in_chans, c)
        self.blocks = nn.Sequential(*[
            MixerBlock(c, self._token_mixer(config), config.channels_mlp_dim, dropout=config.dropout,
                       drop_path=config.drop_path, activation=config.activation, eps=LAYER_NORM_EPS)
            for _ in range(config.num_blocks)])
        self.norm = nn.LayerNorm(c, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(c, config.num_classes) if config.num_classes else nn.Identity()
        self.grad_checkpointing = False
        self.init_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Keep only each block's input for backward and recompute the block's inside there.

        Training memory then holds one block's activations instead of all of them, for one more
        forward pass of all blocks but the last (dropout and drop-path masks are replayed exactly).
        """
        self.grad_checkpointing = enable

    @staticmethod
    def _token_mixer(config: VisionConfig) -> TokenMixingMlp:
        return TokenMixingMlp(config.num_patches, config.tokens_mlp_dim, dropout=config.dropout,
                              activation=config.activation)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official initialisation: LeCun-normal kernels, zero biases, zero head, unit LayerNorms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                lecun_normal_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, in_chans, H, W) -> normalised tokens (B, S, C)."""
        if tuple(x.shape[-2:]) != self.config.image_hw or x.ndim != 4:
            h, w = self.config.image_hw
            raise ValueError(f"expected images of shape (B, {self.config.in_chans}, {h}, {w}), got {tuple(x.shape)}; "
                             f"the token-mixing MLPs are sized for {h}x{w} (see mlpmixer.resize_tokens)")
        xs = self.stem.forward_seq_first(x)  # (B, in_chans, H, W) -> (S, B, C)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):  # sequence-first throughout: token mixing is a plain GEMM
            # the last block's backward comes first, while its activations would still be the newest
            # thing in memory: recomputing it would cost time and save no peak memory
            if self.grad_checkpointing and torch.is_grad_enabled() and i < last:
                xs = checkpoint(block.forward_seq_first, xs, use_reentrant=False)
            else:
                xs = block.forward_seq_first(xs)
        return self.norm(xs).transpose(0, 1)  # (S, B, C) -> (B, S, C), a view

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens (B, S, C) -> logits (B, num_classes), or the pooled (B, C) with ``pre_logits``."""
        x = x.mean(dim=1)  # global average pooling over the S tokens
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """A new zero-initialised head for ``num_classes`` (0: none), e.g. before fine-tuning."""
        self.config = dataclasses.replace(self.config, num_classes=num_classes)
        old = self.norm.weight
        self.head = (nn.Linear(self.config.hidden_dim, num_classes, device=old.device, dtype=old.dtype)
                     if num_classes else nn.Identity())
        if num_classes:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def save_pretrained(self, directory: str | os.PathLike, extra: dict | None = None) -> None:
        """Write ``model.safetensors`` and ``config.json`` (plus ``extra`` keys, e.g. class names)."""
        from .runs import write_config

        out = Path(directory)
        checkpoints.save_weights(self, out / checkpoints.MODEL_FILE)
        write_config(out, {**(extra or {}), "task": "vision", "model": self.config.to_dict()})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> MlpMixer:
        """The model saved by `save_pretrained`, or trained by ``mlpmixer train vision``, in eval mode."""
        model = cls(read_vision_config(directory))
        checkpoints.load_weights(model, Path(directory) / checkpoints.MODEL_FILE)
        return model.eval()


def read_vision_config(directory: str | os.PathLike) -> VisionConfig:
    """The VisionConfig in ``directory``/config.json; a clear error when it holds something else."""
    from .runs import build_config, read_run_config

    saved = read_run_config(directory, "vision")
    return build_config(VisionConfig, saved["model"], Path(directory) / checkpoints.CONFIG_FILE)


def lecun_normal_(weight: Tensor) -> Tensor:
    """JAX's ``lecun_normal``: a normal truncated at ±2σ, rescaled so that its variance is 1 / fan_in."""
    fan_in = weight[0].numel()  # Linear (out, in) and Conv2d (out, in, kh, kw) alike
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # std of a unit normal truncated at ±2
    return nn.init.trunc_normal_(weight, std=std, a=-2.0 * std, b=2.0 * std)
