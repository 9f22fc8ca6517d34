"""kvsharer: KVSharer, calibrated layer-wise KV sharing (https://arxiv.org/abs/2410.18517).

A layout: `layers` layers read an earlier layer's KV cache instead of their own. Such a layer computes
Q only (its K/V projections are skipped), attends over its source's store, and holds nothing. Which
layer reads which comes from the paper's search (kvchat/calibration/kvsharer.py): the most dissimilar
(by averaged K/V) pairs first, each share kept while the final hidden states stay above `threshold`
cosine similarity to the unshared model's on `samples` windows of `tokens` tokens of calibration text
(Python's own documentation, or the file `data`), drawn with `seed`. The map is cached per model and
parameters under KVCHAT_HOME and computed on first use (or by `kvchat calibrate -p kvsharer`).

It composes with any policy or format (the paper: sharing is compatible with intra-layer compression):
they act on the layers that own storage, and a sharing layer reads what its source kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvchat.calibration.cache import cache_path, read_json, write_json
from kvchat.calibration.data import data_key, samples
from kvchat.calibration.kvsharer import search
from kvchat.errors import KvchatError, ProfileError
from kvchat.methods.base import Method


@dataclass
class KVSharer(Method):
    name = "kvsharer"
    role = "layout"
    layers: int = 8
    threshold: float = 0.5
    samples: int = 30
    tokens: int = 64
    seed: int = 0
    data: str | None = None

    def __post_init__(self):
        self._int("layers", lo=0)
        self._float("threshold", lo=-1.0, hi=1.0)
        self._int("samples", lo=1)
        self._int("tokens", lo=2)
        self._int("seed", lo=0)
        if self.data is not None and not isinstance(self.data, str):
            raise self._err("data", "must be a file path (text or JSONL)", self.data)
        self.share: dict[int, int] = {}

    @classmethod
    def keep_all(cls) -> "KVSharer":
        return cls(layers=0)

    # ---- calibration -------------------------------------------------------------------------------
    def calib_params(self) -> dict:
        return {"layers": self.layers, "threshold": self.threshold, "samples": self.samples,
                "tokens": self.tokens, "seed": self.seed, "data": data_key(self.data), "version": 1}

    def cache_file(self, model_name: str):
        return cache_path(model_name, "kvsharer", self.calib_params())

    def calibrate(self, probe, force: bool = False):
        """The share map of the probe's model, searched once and cached; -> the cache file (None when
        `layers` is 0: nothing to search)."""
        if self.layers == 0:
            return None
        self._check_layers(probe.desc)
        path = self.cache_file(probe.model_name)
        if force or read_json(path) is None:
            probe.progress(f"kvsharer: searching which {self.layers} of {probe.desc.n_layers} layers of "
                           f"{probe.model_name} can share a KV cache, once (cached in {path})")
            windows = samples(probe.tokenizer, self.samples, self.tokens, self.seed, self.data)
            found = search(probe, windows, self.layers, self.threshold)
            write_json(path, {"model": probe.model_name, "params": self.calib_params(), **found})
        return path

    def bind(self, desc, probe=None) -> None:
        super().bind(desc, probe)
        self.share = {}
        if self.layers == 0:
            return
        self._check_layers(desc)
        data = read_json(self.cache_file(desc.name))
        if data is None:
            if probe is None:
                raise KvchatError(f"kvsharer needs a calibration of {desc.name}; run `kvchat calibrate -p kvsharer`")
            data = read_json(self.calibrate(probe))
        self.share = {int(l): int(s) for l, s in data["map"].items()}

    def _check_layers(self, desc) -> None:
        if self.layers >= desc.n_layers:
            raise ProfileError(f"kvsharer.layers must be < {desc.n_layers} ({desc.name} has {desc.n_layers} "
                               f"layers and layer 0 keeps its own cache), got {self.layers}")

    def calibration_note(self, model_name: str) -> str:
        """The share map calibrated for `model_name`, or how to make one (for `kvchat profiles show`)."""
        if self.layers == 0:
            return "kvsharer: layers 0, no layer shares (no calibration needed)"
        try:
            data = read_json(self.cache_file(model_name))
        except KvchatError as e:  # the profile's data file is gone: say so, the profile still shows
            return f"kvsharer: {e}"
        if data is None:
            return (f"kvsharer: no share map for {model_name} yet; `kvchat calibrate -p PROFILE` makes one "
                    "(or the first run does)")
        return describe_map(data, model_name)

    # ---- layout ------------------------------------------------------------------------------------
    def aliases(self, desc) -> dict[int, int]:
        return dict(self.share)


def describe_map(data: dict, model_name: str) -> str:
    """One line: which layers read which, how many of those asked for, the final cosine similarity."""
    share = {int(l): int(s) for l, s in data["map"].items()}
    p = data["params"]
    pairs = ", ".join(f"L{l:02d}->L{s:02d}" for l, s in sorted(share.items())) or "none"
    short = "" if len(share) == p["layers"] else f" (only {len(share)} of {p['layers']} stayed above the threshold)"
    return (f"kvsharer share map for {model_name}: {pairs}; {len(share)} layers share{short}, final-hidden "
            f"cosine {data['similarity']:.3f} > threshold {p['threshold']}, {data['tried']} pairs tried")
