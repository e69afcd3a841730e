"""The decoder: causality, RoPE, initialisation, FFN registry and optimizer parameter roles."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from conftest import compose_config
from moa_train import model as model_module
from moa_train.activations import ABBREVIATIONS, ACTIVATIONS, canonical_name, get_activation
from moa_train.ffn import FFN_REGISTRY
from moa_train.model import (
    SPLIT_QUERIES_LENGTHS,
    Transformer,
    apply_rope,
    attention,
    attention_min_head_dim,
    attention_split_queries,
    causal_mask,
    rope_tables,
)
from moa_train.optim import build_optimizer, parameter_roles


def tiny_model(*overrides, seed=0) -> Transformer:
    cfg = compose_config("model=tiny", *overrides)
    torch.manual_seed(seed)
    model = Transformer(cfg.model, cfg.ffn)
    model.init_weights()
    return model


@pytest.mark.parametrize("ffn", sorted(FFN_REGISTRY))
def test_attention_is_causal(ffn):
    model = tiny_model(f"ffn={ffn}")
    tokens = torch.randint(0, 4096, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = torch.randint(0, 4096, (2, 6))
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-5)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


@pytest.mark.parametrize("queries, keys", [(12, 12), (5, 12), (1, 12)])  # training, chunked prefill, decoding
def test_zero_padded_heads_give_the_same_attention_and_gradients(queries, keys):
    """The CPU speed lever pads heads of 10 to 16: the output and the gradients of q, k, v are unchanged."""
    torch.manual_seed(0)
    leaves = [torch.randn(2, 4, n, 10, requires_grad=True) for n in (queries, keys, keys)]
    upstream = torch.randn(2, 4, queries, 10)
    results = []
    for min_head_dim in (0, 16):
        out = attention(*leaves, min_head_dim, **causal_mask(queries, keys, "cpu"))
        grads = torch.autograd.grad((out * upstream).sum(), leaves)
        results.append((out, *grads))
    assert results[0][0].shape == (2, 4, queries, 10)
    for plain, padded in zip(*results):
        torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-6)
        assert plain.abs().max() > 0.1  # a real comparison, not of zeros
    assert attention_min_head_dim(None, "cpu") == 16 and attention_min_head_dim(None, "cuda") == 0
    assert attention_min_head_dim(0, "cpu") == 0


@pytest.mark.parametrize("head_dim, min_head_dim", [(10, 16), (16, 0)])
def test_causal_attention_in_two_halves_equals_one_call(head_dim, min_head_dim, monkeypatch):
    """The CPU speed lever splits the queries of causal self-attention in halves: the output and the
    gradients of q, k, v are SDPA's in one call, with padded heads too; the split is taken for lengths in
    SPLIT_QUERIES_LENGTHS only, never for cached keys (prefill of a chunk, decoding) nor an odd length."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape[-2])
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", counting)
    torch.manual_seed(0)
    length = SPLIT_QUERIES_LENGTHS[0]
    leaves = [torch.randn(2, 3, length, head_dim, requires_grad=True) for _ in range(3)]
    upstream = torch.randn(2, 3, length, head_dim)
    results = []
    for split in (False, True):
        calls.clear()
        out = attention(*leaves, min_head_dim, split, **causal_mask(length, length, "cpu"))
        results.append((out, *torch.autograd.grad((out * upstream).sum(), leaves)))
        assert calls == ([length // 2, length // 2] if split else [length])
    for whole, halves in zip(*results):
        torch.testing.assert_close(halves, whole, rtol=1e-5, atol=1e-6)
        assert whole.abs().max() > 0.1
    for queries, keys in [(SPLIT_QUERIES_LENGTHS[0] // 2,) * 2, (SPLIT_QUERIES_LENGTHS[1] * 2,) * 2,
                          (length - 1, length - 1), (length // 2, length), (1, length)]:
        calls.clear()
        q, k = torch.randn(1, 1, queries, 16), torch.randn(1, 1, keys, 16)
        attention(q, k, k, 0, True, **causal_mask(queries, keys, "cpu"))
        assert calls == [queries], (queries, keys)
    calls.clear()
    attention(*(torch.randn(1, 1, length, 16) for _ in range(3)), 0, True)  # not causal (the ViT): one call
    assert calls == [length]
    assert attention_split_queries(None, "cpu") and not attention_split_queries(None, "cuda")
    assert not attention_split_queries(False, "cpu") and attention_split_queries(True, "cuda")


def test_the_builder_sets_the_attention_levers_from_the_config():
    from moa_train.builder import build_model
    from moa_train.distributed import init_distributed
    from moa_train.model import Attention

    env = init_distributed("none", "cpu")
    for value, expected in (("null", True), ("false", False)):
        model = build_model(compose_config("model=tiny", f"train.attention_split_queries={value}",
                                           "train.attention_min_head_dim=0"), env)
        modules = [m for m in model.modules() if isinstance(m, Attention)]
        assert len(modules) == len(model.layers)
        assert all(m.split_queries is expected and m.min_head_dim == 0 for m in modules)


def test_padded_heads_leave_the_model_output_unchanged():
    model = tiny_model("model.n_heads=16")  # heads of 8
    tokens = torch.randint(0, 4096, (2, 16))
    with torch.no_grad():
        plain = model(tokens)
        for module in model.modules():
            if hasattr(module, "min_head_dim"):
                module.min_head_dim = 16
        padded = model(tokens)
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-5)
    assert sum(getattr(m, "min_head_dim", 0) == 16 for m in model.modules()) == len(model.layers)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    cos, sin = rope_tables(32, 16, 10000.0)

    def score(i, j):
        qi = apply_rope(q, cos[i:i + 1], sin[i:i + 1])
        kj = apply_rope(k, cos[j:j + 1], sin[j:j + 1])
        return (qi * kj).sum().item()

    assert score(5, 2) == pytest.approx(score(20, 17), rel=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)
    # rotation keeps norms
    assert apply_rope(q, cos[7:8], sin[7:8]).norm().item() == pytest.approx(q.norm().item(), rel=1e-5)


def test_rope_tables_are_built_once_and_grown_without_changing_the_angles():
    model = tiny_model()
    tokens = torch.randint(0, 4096, (2, 24))
    with torch.no_grad():
        first = model(tokens[:, :16])
        tables = model._rope_tables
        again = model(tokens[:, :16])
        assert model._rope_tables is tables  # reused, not rebuilt
        assert tables[0].shape[0] == 16
        longer = model(tokens)  # 24 > 16: regrown to max(24, 2 * 16)
    assert model._rope_tables[0].shape[0] == 32
    assert torch.equal(first, again)
    assert torch.equal(model._rope_tables[0][:16], tables[0]) and torch.equal(model._rope_tables[1][:16], tables[1])
    fresh = tiny_model()
    with torch.no_grad():
        assert torch.equal(fresh(tokens), longer)  # tables built at the exact length: the same logits
    # built inside inference_mode, they still serve a training forward (which saves them for backward)
    trained = tiny_model()
    with torch.inference_mode():
        trained(tokens)
    trained(tokens[:, :-1], tokens[:, 1:]).backward()
    assert trained.tok_embeddings.weight.grad is not None


def test_initial_loss_is_near_uniform_and_output_projections_are_depth_scaled():
    model = tiny_model()
    tokens = torch.randint(0, 4096, (4, 32))
    with torch.no_grad():
        loss = model(tokens[:, :-1], tokens[:, 1:]).item()
    assert abs(loss - math.log(4096)) < 0.1
    std = model.cfg.init_std
    wo, w1 = model.layers[0].attn.wo.weight, model.layers[0].ffn.w1.weight
    assert w1.std().item() == pytest.approx(std, rel=0.05)
    assert wo.std().item() == pytest.approx(std / math.sqrt(2 * model.cfg.n_layers), rel=0.05)
    assert model.layers[0].ffn.w3.weight.std().item() == pytest.approx(wo.std().item(), rel=0.05)


def test_same_seed_same_weights():
    a, b, c = tiny_model(seed=1), tiny_model(seed=1), tiny_model(seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.tok_embeddings.weight, c.tok_embeddings.weight)


def test_fixed_ffns_apply_their_activation():
    x = torch.randn(3, 128)
    for name in ("relu2", "gelu", "silu", "relu"):
        ffn = tiny_model(f"ffn={name}").layers[0].ffn
        expected = ffn.w2(get_activation(name)(ffn.w1(x)))
        assert torch.allclose(ffn(x), expected)
    swiglu = tiny_model("ffn=swiglu").layers[0].ffn
    assert torch.allclose(swiglu(x), swiglu.w3(torch.nn.functional.silu(swiglu.w1(x)) * swiglu.w2(x)))


def test_activation_dictionary_names_and_abbreviations():
    x = torch.linspace(-3, 3, 13)
    assert set(ABBREVIATIONS.values()) == set(ACTIVATIONS)
    for abbr, name in ABBREVIATIONS.items():
        assert canonical_name(abbr) == name
        assert torch.equal(get_activation(abbr)(x), get_activation(name)(x))
    assert torch.allclose(get_activation("r2")(x), torch.relu(x) ** 2)
    assert torch.allclose(get_activation("l")(x), torch.where(x > 0, x, 0.01 * x))
    assert torch.equal(get_activation("id")(x), x)
    with pytest.raises(KeyError):
        canonical_name("nope")


def test_parameter_roles_and_adamw_decay_groups():
    model = tiny_model()
    extra = nn.Parameter(torch.zeros(3))
    model.layers[0].ffn.gate = extra
    model.layers[0].ffn.no_weight_decay = ("gate",)  # a module names its undecayed parameters
    roles = parameter_roles(model)
    assert roles["embedding"] == [model.tok_embeddings.weight]
    assert roles["head"] == [model.output.weight]
    assert any(p is extra for p in roles["mixing"])
    assert all(p.ndim == 1 for p in roles["vector"])
    assert len(roles["matrix"]) == model.cfg.n_layers * (4 + 3)
    cfg = compose_config("model=tiny", "optim.weight_decay=0.05", "optim.groups.embedding.lr=5e-3",
                         "optim.groups.vector.weight_decay=0.01")
    optimizer = build_optimizer(model, cfg.optim)
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert sorted(by_name) == ["embedding", "head", "matrix", "mixing", "vector"]
    assert by_name["matrix"]["weight_decay"] == 0.05 and by_name["head"]["weight_decay"] == 0.05
    assert by_name["mixing"]["weight_decay"] == 0.0  # gates and LA coefficients are never decayed by default
    assert by_name["vector"]["weight_decay"] == 0.01  # ... unless a group says so
    assert by_name["embedding"]["base_lr"] == 5e-3 and by_name["matrix"]["base_lr"] == cfg.optim.lr
    assert any(p is extra for p in by_name["mixing"]["params"])
    assert any(p is model.layers[0].attn.wq.weight for p in by_name["matrix"]["params"])
    n_params = len({id(p) for p in model.parameters()})
    assert sum(len(g["params"]) for g in optimizer.param_groups) == n_params
