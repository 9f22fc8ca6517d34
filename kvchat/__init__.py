"""kvchat: chat and batch generation with a compressed KV cache."""

__version__ = "0.1.0"
