"""The names of mlpmixer 0.1.0's ``mlpmixer.mlm``, kept working: masked language modelling now lives in
`mlpmixer.text` (model, masking, loss, `fill_mask`) and `mlpmixer.text_train` (its training task)."""

from .text import IGNORE_INDEX, Fill, LanguageModel, MaskedLanguageModel, MLMConfig, fill_mask, mask_tokens, mlm_loss
from .text_train import SAMPLE_PROMPTS, MLMTask, render_fill

__all__ = ["IGNORE_INDEX", "Fill", "LanguageModel", "MLMConfig", "MLMTask", "MaskedLanguageModel", "SAMPLE_PROMPTS",
           "fill_mask", "mask_tokens", "mlm_loss", "render_fill"]
