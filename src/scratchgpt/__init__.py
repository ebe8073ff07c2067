"""scratchgpt: a GPT language model built from scratch in PyTorch.

    import scratchgpt
    model, tokenizer = scratchgpt.load("runs/baby")
    print(scratchgpt.generate_text(model, tokenizer, "ROMEO:", max_new_tokens=100, seed=1))
"""

from pathlib import Path

import torch

from .build import build_model
from .config import Config, DataConfig, ModelConfig, TrainConfig, config_from_preset
from .errors import ScratchGPTError
from .model import GPT, Bigram
from .sample import generate, generate_text
from .tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer
from .train import TrainResult, train
from .version import __version__


def load(path: str | Path, device: str | torch.device = "cpu"):
    """Load a trained model for inference: `(model, tokenizer)`, the model in eval mode.

    `path` is a run directory (its best/, else last/ checkpoint) or a checkpoint directory.
    """
    from .checkpoint import load_checkpoint

    model, tokenizer, _, _ = load_checkpoint(path, device)
    return model, tokenizer


__all__ = [
    "GPT", "BPETokenizer", "Bigram", "ByteTokenizer", "CharTokenizer", "Config", "DataConfig", "ModelConfig", "ScratchGPTError", "TrainConfig",
    "TrainResult", "build_model", "config_from_preset", "generate", "generate_text", "load", "train", "__version__",
]
