"""kvchat's generation loop: its own forward over the HF submodules, slots over a paged store."""

from kvchat.engine.generate import Engine, PrefillInterrupted
from kvchat.engine.seq import Request, Result, Seq
from kvchat.engine.sampling import SamplingParams

__all__ = ["Engine", "PrefillInterrupted", "Request", "Result", "SamplingParams", "Seq"]
