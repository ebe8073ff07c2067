"""The model a config names: the bigram, the classic GPT (model.py) or the GPT with the modern
parts (modern.py), with the fast CPU kernels (kernels.py) swapped in."""

from __future__ import annotations

import torch.nn as nn

from .config import ModelConfig
from .model import GPT, Bigram
from .modern import ModernGPT
from .speed.kernels import use_fast_kernels


def build_model(config: ModelConfig) -> nn.Module:
    """The model that `config.model_type` and the options beyond GPT-2 name, ready to train or decode."""
    if config.model_type == "bigram":
        return Bigram(config)
    model = ModernGPT(config) if config.beyond_gpt2() else GPT(config)
    return use_fast_kernels(model)
