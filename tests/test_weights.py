"""The runner's weight layouts: native and packed projections compute what F.linear computes, once per model."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from kvchat_kernels import cpu as native
from kvchat.engine import Engine, Request, SamplingParams
from kvchat.cache import KVStore
from kvchat.engine.forward import Runner
from kvchat.engine.weights import Weights, choose_layout, packing_works
from kvchat.methods.base import Method
from kvchat.methods.kvsharer import KVSharer
from kvchat.methods.window import Window
from kvchat.model import LoadedModel, describe
from kvchat.profiles import Profile


def bf16_model(arch: str = "llama") -> LoadedModel:
    lm = tiny_model(arch)
    hf = lm.hf.to(torch.bfloat16)
    return LoadedModel(hf=hf, tokenizer=lm.tokenizer, desc=describe(hf, lm.desc.name), eos_ids=frozenset())


def tokens(lm, profile, prompts, steps=24):
    eng = Engine(lm, profile, max_slots=len(prompts))
    reqs = [Request(str(i), p, SamplingParams(max_new_tokens=steps)) for i, p in enumerate(prompts)]
    return {r.id: r.token_ids for r in eng.run(reqs)}, eng


def test_the_native_layout_where_the_cpu_ops_are_built_else_packed_where_onednn_computes_it(monkeypatch):
    cpu = torch.device("cpu")
    assert native.linear_ok(torch.float32), f"AVX-512 machines run the native matmul: {native.status()}"
    for max_slots in (1, 8):
        assert choose_layout(torch.float32, cpu, max_slots) == "native"
        assert choose_layout(torch.bfloat16, cpu, max_slots) == (
            "native" if native.linear_ok(torch.bfloat16) else ("packed" if packing_works() else "rows"))
    monkeypatch.setenv("KVCHAT_NATIVE", "0")
    assert choose_layout(torch.bfloat16, cpu, 1) == ("packed" if packing_works() else "rows")
    assert choose_layout(torch.float32, cpu, 1) == "transposed"
    assert choose_layout(torch.float32, cpu, 3) == "rows"
    assert choose_layout(torch.float32, cpu, 8) == "rows"
    monkeypatch.setenv("KVCHAT_PACK", "0")
    assert choose_layout(torch.bfloat16, cpu, 1) == "rows"
    assert choose_layout(torch.float32, cpu, 8) == "rows"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])  # qwen2: Q/K/V biases; qwen3: q/k norms
def test_packed_weights_give_the_plain_layouts_logits_and_tokens(monkeypatch, arch):
    prompts = [list(range(3, 40)), list(range(50, 61))]
    profile = Profile("window", methods=[Window(sink=2, recent=16)])
    monkeypatch.setenv("KVCHAT_NATIVE", "0")
    monkeypatch.setenv("KVCHAT_PACK", "0")
    plain_lm = bf16_model(arch)
    want, plain = tokens(plain_lm, profile, prompts)
    monkeypatch.delenv("KVCHAT_PACK")
    packed_lm = bf16_model(arch)
    got, packed = tokens(packed_lm, profile, prompts)
    assert plain.runner.weights.layout == "rows"
    assert packed.runner.weights.layout == ("packed" if packing_works() else "rows")
    assert got == want
    ids = torch.tensor(prompts[0])
    pos = torch.arange(len(prompts[0]))
    a = plain.runner.prefill(plain.store, 0, ids, pos, out="logits")
    b = packed.runner.prefill(packed.store, 0, ids, pos, out="logits")
    assert torch.allclose(a, b, atol=1e-2, rtol=1e-2), (a - b).abs().max()


def decode_logits(lm, ids, n_prompt):
    """Teacher-forced: prefill ids[:n_prompt], then decode the rest one token at a time -> (n, vocab)."""
    runner = Runner(lm)
    store = KVStore(lm.desc, n_slots=1, block_size=8)
    runner.prefill(store, 0, torch.tensor(ids[:n_prompt]), torch.arange(n_prompt))
    return torch.stack([runner.decode(store, [0], torch.tensor([0]), torch.tensor([ids[i]]), torch.tensor([i]))[0]
                        for i in range(n_prompt, len(ids))])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_the_native_decode_is_as_close_to_float32_as_the_torch_path(monkeypatch, arch, dtype):
    """kernels/cpu.py's decode (matmuls, fused norms, RoPE, attention) against the torch path, both
    measured against the float32 torch path: float32 agrees to summation order; bfloat16 is no further
    from float32 than the torch bfloat16 path (it rounds less: float32 attention probabilities)."""
    ids = torch.randint(0, 250, (60,), generator=torch.Generator().manual_seed(3)).tolist()
    monkeypatch.setenv("KVCHAT_NATIVE", "0")
    exact = decode_logits(tiny_model(arch), ids, 21)
    torch_path = decode_logits(bf16_model(arch) if dtype == torch.bfloat16 else tiny_model(arch), ids, 21)
    monkeypatch.delenv("KVCHAT_NATIVE")
    lm = bf16_model(arch) if dtype == torch.bfloat16 else tiny_model(arch)
    runner = Runner(lm)
    assert runner.native == (arch != "qwen3")  # q/k norms keep the torch path for those ops
    assert runner.weights.layout == "native"
    got = decode_logits(lm, ids, 21)
    err, base = (got - exact).abs().max().item(), (torch_path - exact).abs().max().item()
    if dtype == torch.float32:
        assert err < 1e-4 and base < 1e-4, (err, base)
    else:
        assert err <= 1.5 * base, f"native bf16 {err:.3g} from float32, torch bf16 {base:.3g}"


class FixedShare(KVSharer):
    """KVSharer's layout with a given share map instead of a calibrated one."""

    def bind(self, desc, probe=None) -> None:
        Method.bind(self, desc, probe)
        self.share = {2: 0}


def test_a_layer_reading_another_layers_store_gets_its_q_rows_from_packed_weights(monkeypatch):
    """KVSharer's sharing layers compute Q only: from packed Q/K/V, the Q rows are recovered exactly."""
    prompts = [list(range(3, 30))]
    share = Profile("kvsharer", methods=[FixedShare(layers=1)])
    monkeypatch.setenv("KVCHAT_NATIVE", "0")
    monkeypatch.setenv("KVCHAT_PACK", "0")
    want, plain = tokens(bf16_model(), share, prompts)
    monkeypatch.delenv("KVCHAT_PACK")
    got, packed = tokens(bf16_model(), share, prompts)
    assert got == want
    assert packed.store.aliases == {2: 0}
    if packing_works():
        lw = packed.runner.weights.layers[2]
        assert lw.q.built.packed and lw.q.built.w.shape == (lw.q.n_q, plain.desc.hidden)


def test_the_layout_is_built_once_per_model_and_hf_forward_gets_its_weights_back(monkeypatch):
    monkeypatch.setenv("KVCHAT_NATIVE", "0")  # the packed layout (the native one leaves HF's weights as they are)
    lm, twin = bf16_model(), bf16_model()
    ids = torch.tensor([[5, 9, 2, 77, 31]])
    want = twin.hf(ids).logits
    w1 = Weights.of(lm, 1)
    assert Weights.of(lm, 8) is w1  # bfloat16 has one layout at every batch size
    got = lm.hf(ids).logits  # packed weights are unpacked, exactly, for HF's own forward
    assert torch.equal(got, want)
