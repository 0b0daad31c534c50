"""mlpmixer: MLP-Mixer (Tolstikhin et al., 2021) for PyTorch."""

__version__ = "0.1.0"

from .attention import SelfAttention, swap_attention
from .encoder import Encoder, EncoderConfig
from .layers import MixerBlock, Mlp, PatchEmbed, TokenMixer, TokenMixingMlp
from .mixers import FourierMixing, GatedMlpMixer, SpatialGatingUnit
from .mlm import MaskedLanguageModel, MLMConfig, fill_mask, mask_tokens
from .api import load, train_mlm
from .data.tokenizer import CharTokenizer
from .vision import MlpMixer, VisionConfig, create_model, list_models
from .official import load_official_npz
from .resize import resize_tokens

__all__ = [
    "CharTokenizer", "Encoder", "EncoderConfig", "MLMConfig", "MaskedLanguageModel", "MixerBlock", "Mlp",
    "PatchEmbed", "SelfAttention", "TokenMixer", "TokenMixingMlp", "fill_mask", "load", "mask_tokens",
    "swap_attention", "train_mlm",
    "FourierMixing", "GatedMlpMixer", "SpatialGatingUnit",
    "MlpMixer", "VisionConfig", "create_model", "list_models", "load_official_npz", "resize_tokens",
]
