"""DeepSeek-V4 model in plain PyTorch."""

from model.cache import DecodeCache
from model.config import ModelConfig
from model.transformer import ModelOutput, Transformer

__all__ = ["DecodeCache", "ModelConfig", "ModelOutput", "Transformer"]
