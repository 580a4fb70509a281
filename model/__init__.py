"""The GPT-2 / OpenAI GPT family in plain PyTorch: model, tokenizer, generation and engine."""

from .config import GPTConfig
from .errors import BadRequest, CheckpointError, UnknownModel, WWTError
from .engine import Engine
from .gpt import GPT, HEADS, GPTModel, KVCache
from .known import KNOWN_MODELS, ModelSpec, parse_model_spec
from .tokenizer import GPTTokenizer, load_tokenizer
from .weights import load, resolve_checkpoint

__all__ = [
    "Engine", "GPT", "GPTConfig", "GPTModel", "GPTTokenizer", "HEADS", "KNOWN_MODELS", "KVCache", "ModelSpec",
    "BadRequest", "CheckpointError", "UnknownModel", "WWTError",
    "load", "load_tokenizer", "parse_model_spec", "resolve_checkpoint",
]
