"""What a method's calibration may run: the model's own forward, handed to methods in `bind`.

Calibrations (kvchat/calibration/) never import the engine; the engine gives them a `Probe`, whose
`run` prefills token ids through the same loop generation uses (optionally with a candidate share map
of layers) and reports each layer's tensors to a `trace` callback.
"""

from __future__ import annotations

import torch

from kvchat.cache import KVStore
from kvchat.methods.base import Method


class _Rows(Method):
    """Asks every layer for the attention rows of the last `w` queries."""

    name = "probe-rows"

    def __init__(self, w: int):
        self.w = w

    def prefill_rows(self, layer: int) -> int:
        return self.w


class Probe:
    def __init__(self, runner, lm, progress=None):
        self.desc = lm.desc
        self.tokenizer = lm.tokenizer
        self.model_name = lm.desc.name
        self.progress = progress or (lambda msg: None)
        self._runner = runner

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype | None = None):
        """cos, sin (N, 1, D) at `positions` in `dtype` (the model's by default): what the forward multiplies
        keys by, from the model's own rotary embedding (a format storing keys before RoPE rotates them)."""
        x = torch.empty(0, dtype=dtype or self.desc.dtype, device=self.desc.device)
        return self._runner._rope_tables(x, positions.to(self.desc.device))

    @torch.no_grad()
    def run(self, ids, rows: int = 0, aliases: dict[int, int] | None = None, trace=None, out: str = "hidden"):
        """Prefill `ids` (T,) in a fresh one-slot store; -> final normed hidden states (T, hidden), or the
        logits (`out="logits"`). `rows`: every layer's trace gets the last `rows` queries' attention
        probabilities (H_q, rows, T). `aliases`: {layer: earlier layer} run as a share map."""
        ids = torch.as_tensor(ids, device=self.desc.device).view(-1)
        store = KVStore(self.desc, 1, aliases=aliases)
        pos = torch.arange(ids.numel(), device=self.desc.device)
        return self._runner.prefill(store, 0, ids, pos, out=out, methods=[_Rows(rows)] if rows else [], trace=trace)


def make_probe(lm, progress=None) -> Probe:
    """A probe over its own runner (`kvchat calibrate` runs calibrations without an engine)."""
    from kvchat.engine.forward import Runner

    return Probe(Runner(lm), lm, progress)
