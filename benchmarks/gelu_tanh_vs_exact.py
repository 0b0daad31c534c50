"""How much do logits move when a Mixer trained with one GELU runs with the other?

Flax's ``nn.gelu`` (the official checkpoints) is the tanh approximation; PyTorch's default is exact.
Prints the largest logit difference and the top-1 agreement for (a) Mixer-B/16 at 224 with the
official initialisation and a random (LeCun-normal) head on random images, and (b) a trained digits
run, if given: ``python benchmarks/gelu_tanh_vs_exact.py [RUN_DIR]``.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from mlpmixer import MlpMixer, create_model
from mlpmixer.data.images import Preprocess, load_digits
from mlpmixer.vision import lecun_normal_


def compare(model: MlpMixer, x: torch.Tensor, labels: torch.Tensor | None = None) -> str:
    """Logits of ``model`` with exact GELU vs with tanh GELU, same weights."""
    exact_model, tanh_model = (MlpMixer(dataclasses.replace(model.config, gelu_approximate=a)).eval()
                               for a in ("none", "tanh"))
    for m in (exact_model, tanh_model):
        m.load_state_dict(model.state_dict())
    with torch.no_grad():
        exact, tanh = exact_model(x), tanh_model(x)
    diff = (exact - tanh).abs()
    line = (f"max |Δlogit| {diff.max():.2e} (relative to max |logit| {diff.max() / exact.abs().max():.2e}), "
            f"mean {diff.mean():.2e}; top-1 agrees on {(exact.argmax(-1) == tanh.argmax(-1)).float().mean():.2%}")
    if labels is not None:
        line += (f"; top-1 exact {(exact.argmax(-1) == labels).float().mean():.2%}, "
                 f"tanh {(tanh.argmax(-1) == labels).float().mean():.2%}")
    return line


def main() -> None:
    torch.manual_seed(0)
    b16 = create_model("mixer_b16_224")
    with torch.no_grad():
        lecun_normal_(b16.head.weight)  # the official zero head would make every logit 0
    print("B/16, random init, 8 random images:", compare(b16, torch.randn(8, 3, 224, 224)))
    if len(sys.argv) > 1:
        model = MlpMixer.from_pretrained(sys.argv[1])
        val = load_digits().val
        pre = Preprocess(model.config.image_hw, 1, crop_pct=1.0)
        print(f"trained digits run ({model.config.gelu_approximate} GELU), {len(val)} validation images:",
              compare(model, pre.normalize(val.images), val.labels))


if __name__ == "__main__":
    main()
