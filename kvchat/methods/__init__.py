"""KV-cache methods, one file each. `REGISTRY` maps the keys under a profile's `methods:` to classes."""

from kvchat.methods.base import Method, PrefillCtx
from kvchat.methods.cskv import CSKV
from kvchat.methods.d2o import D2O
from kvchat.methods.half import Half
from kvchat.methods.kivi import Kivi
from kvchat.methods.kvquant import KVQuant
from kvchat.methods.kvsharer import KVSharer
from kvchat.methods.pyramid import PyramidInfer
from kvchat.methods.razor import RazorAttention
from kvchat.methods.tova import TOVA
from kvchat.methods.window import Window

REGISTRY: dict[str, type[Method]] = {
    Window.name: Window,
    PyramidInfer.name: PyramidInfer,
    RazorAttention.name: RazorAttention,
    D2O.name: D2O,
    TOVA.name: TOVA,
    Half.name: Half,
    Kivi.name: Kivi,
    KVQuant.name: KVQuant,
    KVSharer.name: KVSharer,
    CSKV.name: CSKV,
}

__all__ = ["REGISTRY", "Method", "PrefillCtx"]
