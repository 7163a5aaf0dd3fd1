"""DeepSeek-V4 model in plain PyTorch."""

from model.config import ModelConfig
from model.transformer import ModelOutput, Transformer

__all__ = ["ModelConfig", "ModelOutput", "Transformer"]
