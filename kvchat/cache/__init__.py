"""The KV store: paged, ragged per (slot, layer, kv head), with physical byte accounting."""

from kvchat.cache.kvstore import KVStore
from kvchat.cache.store import LayerStore

__all__ = ["KVStore", "LayerStore"]
