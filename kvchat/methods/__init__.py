"""KV-cache methods, one file each. `REGISTRY` maps the keys under a profile's `methods:` to classes."""

from kvchat.methods.base import Method, PrefillCtx
from kvchat.methods.window import Window

REGISTRY: dict[str, type[Method]] = {
    Window.name: Window,
}

__all__ = ["REGISTRY", "Method", "PrefillCtx"]
