"""The KV store: formats per layer (paged, ragged per (slot, layer, kv head)), aliases, byte accounting."""

from kvchat.cache.dense import DenseFormat
from kvchat.cache.format import Format, Tokens
from kvchat.cache.kvstore import KVStore
from kvchat.cache.usage import Usage, saved

__all__ = ["DenseFormat", "Format", "KVStore", "Tokens", "Usage", "saved"]
