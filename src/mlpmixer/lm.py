"""The names of mlpmixer 0.1.0's ``mlpmixer.lm``, kept working: causal language modelling now lives in
`mlpmixer.text` (model, loss, `generate`) and `mlpmixer.text_train` (its training task)."""

from .text import CausalLanguageModel, LanguageModel, LMConfig, generate, lm_loss
from .text_train import LMTask

__all__ = ["CausalLanguageModel", "LMConfig", "LMTask", "LanguageModel", "generate", "lm_loss"]
