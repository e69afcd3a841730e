"""LA and MoA: fused autograd against the plain formula, baseline init, expressivity, counts, memory."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config
from moa_train.budget import count_parameters
from moa_train.config import validate_config
from moa_train.errors import ConfigError
from moa_train.ffn import FFN_REGISTRY, FeedForward, build_ffn
from moa_train.ffn.kernels import pair_mix, pair_mix_reference, product_mix, product_mix_reference
from moa_train.model import Transformer
from moa_train.optim import build_optimizer

MIXTURES = sorted(n for n, s in FFN_REGISTRY.items() if s.mixture)
DICT_A = ("relu2", "gelu", "silu", "tanh", "leaky_relu")
DICT_B = ("identity", "tanh", "silu", "relu")


def ffn_cfg(name, **overrides):
    base = {"name": name, "dict": None, "up_dict": None, "gate": "sigmoid", "gate_bias": False, "gate_groups": 1,
            "init": "uniform", "kernel": "eager", "gate_init_std": 0.0, "match_params_of": None}
    return OmegaConf.create({**base, **overrides})


K1, K2 = len(DICT_A), len(DICT_B)


def make_inputs(n_coef, groups=2, n=5, h=3, k1=K1, k2=K2, pair=False, dtype=torch.float64):
    torch.manual_seed(0)
    a = torch.randn(n, groups, h, dtype=dtype, requires_grad=True)
    b = torch.randn(n, groups, h, dtype=dtype, requires_grad=True)
    c = torch.randn(n_coef, groups, k1 * k2 if pair else k1, dtype=dtype, requires_grad=True)
    e = torch.randn(n_coef, groups, k2, dtype=dtype, requires_grad=True)
    return a, b, c, e


def _nudge_off_kinks(*tensors):
    # ReLU-family kinks at 0 break finite differences; keep inputs away from them.
    with torch.no_grad():
        for t in tensors:
            t.add_(torch.where(t.abs() < 0.05, 0.1, 0.0))


@pytest.mark.parametrize("n_coef", [5, 1], ids=["per-token", "shared"])
@pytest.mark.parametrize("form", ["type1", "one", "bi"])
def test_product_mix_gradcheck_against_formula(form, n_coef):
    a, b, c, e = make_inputs(n_coef)
    _nudge_off_kinks(a, b)
    args = {"type1": (a, c, DICT_A), "one": (a, c, DICT_A, b), "bi": (a, c, DICT_A, b, e, DICT_B)}[form]
    fused = lambda *t: product_mix(*_bind(args, t), kernel="eager")  # noqa: E731
    tensors = tuple(x for x in args if isinstance(x, torch.Tensor))
    assert torch.autograd.gradcheck(fused, tensors, eps=1e-6, atol=1e-5)
    out = product_mix(*args, kernel="eager")
    ref = product_mix_reference(*args)
    assert torch.allclose(out, ref)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, tensors, grad)
    want = torch.autograd.grad(ref, tensors, grad)
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.allclose(g, w, atol=1e-10)


@pytest.mark.parametrize("n_coef", [5, 1], ids=["per-token", "shared"])
def test_pair_mix_gradcheck_against_formula(n_coef):
    a, b, C, _ = make_inputs(n_coef, pair=True)
    _nudge_off_kinks(a, b)
    assert torch.autograd.gradcheck(lambda x, y, z: pair_mix(x, y, z, DICT_A, DICT_B, kernel="eager"), (a, b, C),
                                    eps=1e-6, atol=1e-5)
    out = pair_mix(a, b, C, DICT_A, DICT_B, kernel="eager")
    ref = pair_mix_reference(a, b, C, DICT_A, DICT_B)
    assert torch.allclose(out, ref)
    grad = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (a, b, C), grad), torch.autograd.grad(ref, (a, b, C), grad)):
        assert torch.allclose(g, w, atol=1e-10)


def _bind(template, tensors):
    it = iter(tensors)
    return tuple(next(it) if isinstance(x, torch.Tensor) else x for x in template)


@pytest.mark.slow
def test_compiled_kernels_match_eager():
    a, b, c, e = make_inputs(5, dtype=torch.float32)
    _, _, C, _ = make_inputs(5, pair=True, dtype=torch.float32)
    for fn in (lambda k: product_mix(a, c, DICT_A, b, e, DICT_B, kernel=k),
               lambda k: pair_mix(a, b, C, DICT_A, DICT_B, kernel=k)):
        outs = {}
        for kernel in ("eager", "compiled"):
            out = fn(kernel)
            grads = torch.autograd.grad(out, (a, b), torch.ones_like(out))
            outs[kernel] = (out, *grads)
        for x, y in zip(outs["eager"], outs["compiled"]):
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MIXTURES)
@pytest.mark.parametrize("gate", ["sigmoid", "tanh", "softmax", "linear"])
def test_baseline_init_reproduces_the_baseline(name, gate):
    spec = FFN_REGISTRY[name]
    torch.manual_seed(0)
    mixture = build_ffn(ffn_cfg(name, init="baseline", gate=gate), dim=16, hidden=32)
    mixture.reset_parameters(0.3, 0.3)
    baseline = build_ffn(ffn_cfg(spec.baseline), dim=16, hidden=32)
    baseline.load_state_dict({k: v for k, v in mixture.state_dict().items() if k.split(".")[0] in ("w1", "w2", "w3")})
    x = torch.randn(4, 7, 16)
    assert torch.allclose(mixture(x), baseline(x), atol=1e-6)
    # ... and the mixture really is more than its baseline: perturbing the coefficients changes it
    with torch.no_grad():
        for p in mixture.gates.parameters():
            p.add_(0.5 * torch.randn_like(p))
    assert not torch.allclose(mixture(x), baseline(x), atol=1e-3)


@pytest.mark.parametrize("name", MIXTURES)
def test_uniform_init_values(name):
    ffn = build_ffn(ffn_cfg(name), dim=8, hidden=16)
    coefficients = ffn.gates(torch.randn(3, 8))
    k = len(ffn.mixture.names_a)
    if FFN_REGISTRY[name].mixture == "moa":
        assert torch.allclose(coefficients, torch.full_like(coefficients, 0.5))  # sigmoid(0)
    elif FFN_REGISTRY[name].form == "bi":
        assert torch.allclose(coefficients[..., :k], torch.tensor(1 / k))
        assert torch.allclose(coefficients[..., k:], torch.tensor(1 / 3))
    elif FFN_REGISTRY[name].form == "qd":
        assert torch.allclose(coefficients, torch.tensor(1 / 12))
    else:
        assert torch.allclose(coefficients, torch.tensor(1 / k))


@pytest.mark.parametrize("name", MIXTURES)
@pytest.mark.parametrize("groups, bias", [(1, False), (2, False), (1, True)])
def test_extra_parameters_match_closed_form(name, groups, bias):
    d, k1, k2 = 12, 4, 3
    spec = FFN_REGISTRY[name]
    entries = {"one": k1, "bi": k1 + k2, "qd": k1 * k2}[spec.form]
    expected = groups * entries * (d + bias) if spec.mixture == "moa" else groups * entries
    ffn = build_ffn(ffn_cfg(name, gate_groups=groups, gate_bias=bias), dim=d, hidden=24)
    assert sum(p.numel() for p in ffn.extra_parameters()) == expected
    projections = sum(p.numel() for n in ffn.projections for p in getattr(ffn, n).parameters())
    assert projections == (2 if spec.ffn_type == "type1" else 3) * d * 24


@pytest.mark.parametrize("name", MIXTURES)
def test_dense_012b_extra_under_one_percent(name):
    cfg = compose_config("model=dense_0.12b", f"ffn={name}")
    validate_config(cfg)
    with torch.device("meta"):
        counts = count_parameters(Transformer(cfg.model, cfg.ffn))
    assert 0 < counts["ffn_extra"] < 0.01 * counts["total"]


def test_gates_and_coefficients_are_not_decayed():
    cfg = compose_config("model=tiny", "ffn=bi_moa", "ffn.gate_bias=true", "ffn.kernel=eager")
    model = Transformer(cfg.model, cfg.ffn)
    optimizer = build_optimizer(model, cfg.optim)
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    extras = [p for m in model.modules() if isinstance(m, FeedForward) for p in m.extra_parameters()]
    assert len(extras) == 2 * cfg.model.n_layers  # gate weight and bias per layer
    assert all(id(p) in no_decay for p in extras)
    assert id(model.layers[0].ffn.w1.weight) not in no_decay


def _saved_bytes(module, x):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum()
    return total


@pytest.mark.parametrize("name", MIXTURES)
def test_memory_saved_for_backward_stays_at_baseline_level(name):
    """The K activated copies of the hidden tensor are not kept: saved bytes <= baseline's + gates."""
    torch.manual_seed(0)
    d, m, tokens = 64, 256, 512
    mixture = build_ffn(ffn_cfg(name), dim=d, hidden=m)
    baseline = build_ffn(ffn_cfg(FFN_REGISTRY[name].baseline), dim=d, hidden=m)
    x = torch.randn(tokens, d, requires_grad=True)
    saved, reference = _saved_bytes(mixture, x), _saved_bytes(baseline, x)
    gates = tokens * sum(mixture.gates.segments) * 4
    assert saved <= reference + gates + tokens * d * 4, (saved, reference)
    hidden_copy = tokens * m * 4
    assert saved < reference + hidden_copy  # not even one extra m-wide tensor


# --- expressivity witnesses (docs/design.md section 1)


def _fit(ffn, x, y, steps=600, lr=0.03):
    optimizer = torch.optim.Adam(ffn.parameters(), lr=lr)
    for _ in range(steps):
        loss = (ffn(x)[:, 0] - y).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (ffn(x)[:, 0] - y).pow(2).mean().item()


def _best_fit(make, x, y, restarts=4):
    errors = []
    for seed in range(restarts):
        torch.manual_seed(seed)
        ffn = make()
        ffn.reset_parameters(0.7, 0.7)
        for p in ffn.parameters():  # also start the coefficients away from symmetric points
            p.data.add_(0.1 * torch.randn_like(p))
        errors.append(_fit(ffn, x, y))
    return min(errors)


def _width1(name, **overrides):
    return lambda: build_ffn(ffn_cfg(name, **overrides), dim=2, hidden=1)


def test_witness_la1_fits_relu_plus_relu_squared_at_width_one():
    torch.manual_seed(0)
    x = torch.empty(512, 2).uniform_(-2, 2)
    y = torch.relu(x[:, 0]) + torch.relu(x[:, 0]) ** 2
    variance = y.var().item()
    la = _best_fit(_width1("la1", dict=["r", "r2"]), x, y)
    assert la < 1e-3 * variance
    for fixed in ("relu", "relu2", "gelu", "silu"):
        assert _best_fit(_width1(fixed), x, y) > 20 * la
        assert _best_fit(_width1(fixed), x, y) > 1e-3 * variance


def test_witness_moa1_fits_gated_product_at_width_one():
    torch.manual_seed(0)
    x = torch.empty(1024, 2).uniform_(-2, 2)
    y = torch.tanh(2.0 * x[:, 0]) * torch.relu(x[:, 1])
    variance = y.var().item()
    moa = _best_fit(_width1("moa1", dict=["r"], gate="tanh"), x, y)
    la = _best_fit(_width1("la1", dict=["r", "r2", "g", "s", "t"]), x, y)
    assert moa < 0.02 * variance
    assert la > 10 * moa


# --- bad input


@pytest.mark.parametrize("overrides, key, needle", [
    (["ffn=moa1", "ffn.dict=[r2,nope]"], "ffn.dict", "nope"),
    (["ffn=qd_moa", "ffn.up_dict=[id,sin]"], "ffn.up_dict", "sin"),
    (["ffn=moa1", "ffn.dict=[]"], "ffn.dict", "empty"),
    (["ffn=moa1", "ffn.up_dict=[id]"], "ffn.up_dict", "Type-I"),
    (["ffn=one_moa", "ffn.up_dict=[id]"], "ffn.up_dict", "one-sided"),
    (["ffn=moa1", "ffn.gate=relu"], "ffn.gate", "sigmoid, tanh, softmax, linear"),
    (["ffn=la1", "ffn.init=random"], "ffn.init", "uniform, normalized, baseline"),
    (["ffn=bi_moa", "ffn.gate=tanh", "ffn.init=uniform"], "ffn.init", "tanh(0) = 0"),
    (["ffn=moa1", "ffn.gate=linear", "ffn.init=uniform"], "ffn.init", "normalized"),
    (["ffn=moa1", "ffn.gate_init_std=-1"], "ffn.gate_init_std", ">= 0"),
    (["ffn=qd_moa", "ffn.match_params_of=qd_moa"], "ffn.match_params_of", "itself a variant"),
    (["ffn=swiglu", "ffn.match_params_of=moa1"], "ffn.match_params_of", "one_moa"),
    (["ffn=relu2", "ffn.match_params_of=nope"], "ffn.match_params_of", "la1, moa1"),
    (["ffn=moa1", "ffn.init=baseline", "ffn.dict=[g,s]"], "ffn.dict", "relu2"),
    (["ffn=bi_moa", "ffn.init=baseline", "ffn.up_dict=[t,s]"], "ffn.up_dict", "identity"),
    (["ffn=swiglu", "ffn.dict=[s]"], "ffn.dict", "fixed activation"),
    (["ffn=moa1", "ffn.dict=[s,silu]"], "ffn.dict", "twice"),
    (["ffn=moa1", "ffn.gate_groups=3"], "ffn.gate_groups", "divide"),
    (["ffn=moa1", "ffn.kernel=triton"], "ffn.kernel", "auto, compiled, eager"),
])
def test_bad_ffn_config_is_refused(overrides, key, needle):
    cfg = compose_config("model=tiny", *overrides)
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert info.value.key == key and needle in str(info.value)


def test_unknown_activation_lists_the_valid_ones():
    cfg = compose_config("model=tiny", "ffn=moa1", "ffn.dict=[r2,nope]")
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    for abbr in ("g", "s", "r", "r2", "l", "t", "id"):
        assert f"{abbr} (" in str(info.value)


def test_cli_unknown_activation_is_named_without_traceback():
    from conftest import run_cli

    result = run_cli("model=tiny", "ffn=moa1", "ffn.dict=[r2,nope]")
    assert result.returncode != 0
    message = result.stderr + result.stdout
    assert "Traceback" not in message and "nope" in message and "ffn.dict" in message
    assert "r2 (relu2)" in message and "id (identity)" in message


# ----------------------------------------------------------------------------- where the gates start


def _segments_sum(ffn, coefficients):
    sizes = ffn.gates.segments
    return [part.sum(-1) for part in coefficients.split(sizes, dim=-1)]


@pytest.mark.parametrize("name", [n for n in MIXTURES if FFN_REGISTRY[n].mixture == "moa"])
@pytest.mark.parametrize("gate", ["sigmoid", "tanh", "softmax", "linear"])
def test_normalized_init_starts_every_segment_at_a_sum_of_one(name, gate):
    ffn = build_ffn(ffn_cfg(name, init="normalized", gate=gate), dim=8, hidden=16)
    coefficients = ffn.gates(torch.randn(5, 8))
    for total in _segments_sum(ffn, coefficients):
        assert torch.allclose(total, torch.ones_like(total))
    sizes = ffn.gates.segments
    expected = torch.cat([torch.full((k,), 1.0 / k) for k in sizes])
    assert torch.allclose(coefficients, expected.expand_as(coefficients))
    # the offset is fixed, the gate learns: a gradient step on U moves the gates away from 1/K per token
    x = torch.randn(5, 8)
    (ffn(x.view(1, 5, 8)) ** 2).sum().backward()
    assert ffn.gates.weight.grad.abs().sum() > 0


def test_uniform_sigmoid_mixture_starts_at_k_over_two_times_one_activation():
    """The starting scale the CPU study ran with: every sigmoid gate at 0.5, so a K-entry moa1 sums to K/2."""
    ffn = build_ffn(ffn_cfg("moa1", init="uniform"), dim=8, hidden=16)
    [total] = _segments_sum(ffn, ffn.gates(torch.randn(3, 8)))
    assert torch.allclose(total, torch.full_like(total, len(ffn.mixture.names_a) / 2))


def test_gate_init_std_draws_token_dependent_gates_at_the_start():
    torch.manual_seed(0)
    zero = build_ffn(ffn_cfg("moa1"), dim=8, hidden=16)
    drawn = build_ffn(ffn_cfg("moa1", gate_init_std=0.5), dim=8, hidden=16)
    x = torch.randn(6, 8)
    assert zero.gates(x).std(0).max() == 0  # U = 0: every token the same gates
    assert drawn.gates(x).std(0).min() > 0.01
    assert drawn.gates.weight.std().item() == pytest.approx(0.5, rel=0.35)


@pytest.mark.parametrize("gate", ["tanh", "linear"])
def test_a_tanh_or_linear_bi_moa_trains_from_the_first_step(gate):
    """With the default init the FFN is not dead at step 0: its projections get gradients (issue acceptance)."""
    cfg = compose_config("model=tiny", "ffn=bi_moa", f"ffn.gate={gate}", "model.vocab_size=512")
    validate_config(cfg)
    torch.manual_seed(0)
    model = Transformer(cfg.model, cfg.ffn)
    model.init_weights()
    tokens = torch.randint(0, 512, (2, 16))
    model(tokens, tokens).backward()
    for block in model.layers:
        for name in ("w1", "w2", "w3"):
            assert getattr(block.ffn, name).weight.grad.abs().sum() > 0, (gate, name)
    assert model.layers[0].ffn(torch.randn(1, 4, cfg.model.dim)).abs().sum() > 0


# ----------------------------------------------------------------------------- the parameter-matched control


@pytest.mark.parametrize("baseline, variant", [("swiglu", "qd_moa"), ("swiglu", "one_moa"), ("relu2", "moa1"),
                                               ("swiglu", "bi_la")])
@pytest.mark.parametrize("model", ["dense_40k", "dense_0.12b", "tiny_moe"])
def test_a_matched_baseline_holds_at_least_the_variants_parameters_within_one_hidden_unit(model, baseline, variant):
    from moa_train.builder import parameter_counts

    cfg = compose_config(f"model={model}", f"ffn={variant}", "model.vocab_size=512")
    matched = compose_config(f"model={model}", f"ffn={baseline}", f"ffn.match_params_of={variant}",
                             "model.vocab_size=512")
    plain = compose_config(f"model={model}", f"ffn={baseline}", "model.vocab_size=512")
    validate_config(matched)
    (target, _), (got, budget), (base, base_budget) = map(parameter_counts, (cfg, matched, plain))
    assert got["ffn_extra"] == 0 and got["total"] > base["total"]
    n_ffns = cfg.model.n_layers * (1 + cfg.model.moe.n_experts + 1 if cfg.model.family == "moe" else 1)
    unit = (3 if FFN_REGISTRY[baseline].ffn_type == "type2" else 2) * cfg.model.dim
    assert target["total"] <= got["total"] < target["total"] + n_ffns * unit
    assert budget == base_budget  # trained on the same tokens as the plain baseline


def test_the_matched_control_is_a_preset_and_reports_as_a_variant():
    cfg = compose_config("model=dense_40k", "ffn=swiglu_match_qd_moa")
    assert cfg.ffn.name == "swiglu" and cfg.ffn.match_params_of == "qd_moa"
    from moa_train.report import Run

    config = OmegaConf.to_container(cfg, resolve=True)
    assert Run(None, "completed", config).variant == "swiglu[match_params_of=qd_moa]"
