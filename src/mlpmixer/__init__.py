"""mlpmixer: MLP-Mixer (Tolstikhin et al., 2021) for PyTorch."""

__version__ = "0.1.0"

from .attention import SelfAttention, swap_attention
from .encoder import Encoder, EncoderConfig
from .layers import MixerBlock, Mlp, PatchEmbed, TokenMixer, TokenMixingMlp
from .mixers import FourierMixing, GatedMlpMixer, SpatialGatingUnit
from .text import (CausalLanguageModel, LanguageModel, LMConfig, MaskedLanguageModel, MLMConfig, TextConfig,
                   fill_mask, generate, mask_tokens)
from .text_train import train_mlm, train_text
from .hub import evaluate, load
from .vision_train import predict
from .data.tokenizer import CharTokenizer
from .vision import MlpMixer, VisionConfig, create_model, list_models
from .official import load_official_npz
from .resize import resize_tokens

__all__ = [
    "CharTokenizer", "Encoder", "EncoderConfig", "MLMConfig", "MaskedLanguageModel", "MixerBlock", "Mlp",
    "PatchEmbed", "SelfAttention", "TokenMixer", "TokenMixingMlp", "fill_mask", "load", "mask_tokens",
    "swap_attention", "train_mlm",
    "CausalLanguageModel", "LMConfig", "LanguageModel", "TextConfig", "evaluate", "generate", "predict", "train_text",
    "FourierMixing", "GatedMlpMixer", "SpatialGatingUnit",
    "MlpMixer", "VisionConfig", "create_model", "list_models", "load_official_npz", "resize_tokens",
]
