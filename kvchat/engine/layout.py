"""Resolving a profile's roles for one model: which layers share storage, which format each layer uses.

Contradictions are one-line profile errors: a layer shared twice, a share with a later (or the same)
layer, a chain of shares, two formats on one layer.
"""

from __future__ import annotations

from kvchat.errors import ProfileError


def resolve_aliases(methods, desc) -> dict[int, int]:
    """{layer: earlier layer whose store it reads}, from every layout method of the profile."""
    aliases: dict[int, int] = {}
    by: dict[int, str] = {}
    for m in methods:
        for layer, src in m.aliases(desc).items():
            if not 0 <= layer < desc.n_layers:
                raise ProfileError(f"{m.name}: layer {layer} does not exist (the model has {desc.n_layers} layers)")
            if layer in aliases:
                raise ProfileError(f"layer {layer} is shared twice: {by[layer]} maps it to layer {aliases[layer]}, "
                                   f"{m.name} to layer {src}; keep one layout method")
            if not 0 <= src < layer:
                raise ProfileError(f"{m.name}: layer {layer} can only read an earlier layer's store, not layer {src}")
            aliases[layer], by[layer] = src, m.name
    for layer, src in aliases.items():
        if src in aliases:
            raise ProfileError(f"layer {layer} reads layer {src}, which itself reads layer {aliases[src]}: a chain "
                               f"of shares; map layer {layer} to layer {aliases[src]} directly")
    return aliases


def build_formats(methods, desc, n_slots: int, block_size: int, with_bias: bool, pinned: int,
                  aliases: dict[int, int]) -> dict[int, object]:
    """{owned layer: format object} for layers a format method stores; the rest stay dense."""
    formats, by = {}, {}
    for m in methods:
        for layer in m.format_layers(desc):
            if layer in by:
                raise ProfileError(f"layer {layer} has two formats: {by[layer]} and {m.name}; a layer stores "
                                   "tokens one way (keep one format method, or give them disjoint layers)")
            by[layer] = m.name
            if layer not in aliases:  # a layer reading another's store stores nothing
                formats[layer] = m.make_format(layer, n_slots, block_size, desc, with_bias, pinned)
    return formats
