"""Everything a run needs before it generates: the profile, the model, the sampling defaults.

Shared by the chat, the REPL and batch mode; below the CLI so batch does not import it.
"""

from __future__ import annotations

import logging
import os
import sys


def quiet_transformers() -> None:
    """No library warnings or progress bars on a user's terminal: kvchat prints its own."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def setup(opts: dict):
    """Load the profile first (cheap, fails fast on a typo), then the model. -> (profile, lm, params)"""
    from kvchat.engine import SamplingParams
    from kvchat.model import load_model
    from kvchat.profiles import load_profile

    profile = load_profile(opts["profile"])
    quiet_transformers()
    lm = load_model(opts["model"], opts["device"], opts["dtype"], progress=lambda m: print(m, file=sys.stderr))
    params = SamplingParams(max_new_tokens=opts["max_new_tokens"], temperature=opts["temperature"],
                            top_p=opts["top_p"], top_k=opts["top_k"], seed=opts["seed"])
    return profile, lm, params
