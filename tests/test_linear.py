"""CPU linear layers through oneDNN (linear.py): the same numbers as F.linear to float32 rounding, gradients
included, compiled or not; chosen by train.cpu_linear and the CPU's vendor; refused when unknown."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from conftest import compose_config
from moa_train import linear as linear_module
from moa_train.config import validate_config
from moa_train.errors import ConfigError
from moa_train.linear import Linear, linear, set_cpu_linear

needs_onednn = pytest.mark.skipif(not linear_module.onednn_available(), reason="torch built without oneDNN")


@pytest.fixture
def backend():
    """Sets the process-wide backend for a test and puts back the one before it."""
    before = linear_module.cpu_linear_backend()
    yield set_cpu_linear
    set_cpu_linear(before)


def _ops_run(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key for event in prof.key_averages()}


def _forward_and_gradients(x, weight, bias, fn):
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    bias = bias.clone().requires_grad_() if bias is not None else None
    y = fn(x, weight, bias)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))  # not all ones: the gradients' rows differ
    return y.detach(), x.grad, weight.grad, None if bias is None else bias.grad


@needs_onednn
@pytest.mark.parametrize("shape, with_bias, transposed", [((64, 24), False, False), ((3, 20, 24), False, False),
                                                          ((3, 20, 24), True, False), ((64, 24), False, True)])
def test_onednn_linear_equals_f_linear_with_gradients(shape, with_bias, transposed, backend):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator)
    if transposed:  # a strided input, as the head's gradient and views hand it
        x = torch.randn(shape[1], shape[0], generator=generator).t()
    weight = torch.randn(40, 24, generator=generator)
    bias = torch.randn(40, generator=generator) if with_bias else None
    backend("blas")
    reference = _forward_and_gradients(x, weight, bias, F.linear)
    backend("onednn")
    assert "moa_train::onednn_linear" in _ops_run(lambda: _forward_and_gradients(x, weight, bias, linear))
    for got, want in zip(_forward_and_gradients(x, weight, bias, linear), reference):
        if want is None:
            assert got is None
            continue
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert want.abs().max() > 0.5  # a comparison of near-zero tensors would prove nothing


@needs_onednn
def test_the_backend_decides_the_path_and_autocast_keeps_f_linear(backend):
    layer = Linear(16, 8, bias=False)
    x = torch.randn(4, 16)
    backend("blas")
    assert "moa_train::onednn_linear" not in _ops_run(lambda: layer(x))
    backend("onednn")
    assert "moa_train::onednn_linear" in _ops_run(lambda: layer(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's casts are F.linear's business
        assert "moa_train::onednn_linear" not in _ops_run(lambda: layer(x))
    assert "moa_train::onednn_linear" not in _ops_run(lambda: layer.double()(x.double()))
    assert set(Linear(16, 8).state_dict()) == set(torch.nn.Linear(16, 8).state_dict())


@needs_onednn
def test_a_compiled_function_calls_onednn_and_matches_eager(backend):
    backend("onednn")
    layer = Linear(24, 32, bias=False)

    def loss(x):
        return F.silu(layer(x)).square().sum()

    x = torch.randn(3, 10, 24)
    results = []
    for fn in (loss, torch.compile(loss)):
        xx = x.clone().requires_grad_()
        fn(xx).backward()
        results.append((xx.grad, layer.weight.grad.clone()))
        layer.weight.grad = None
    for compiled, eager in zip(results[1], results[0]):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vendor, mode, expected", [
    ("AuthenticAMD", "auto", "onednn"), ("GenuineIntel", "auto", "blas"), ("", "auto", "blas"),
    ("AuthenticAMD", "blas", "blas"), ("GenuineIntel", "onednn", "onednn"),
])
def test_auto_takes_onednn_off_intel_cpus(vendor, mode, expected, monkeypatch):
    monkeypatch.setattr(linear_module, "onednn_available", lambda: True)
    assert linear_module.resolve_cpu_linear(mode, vendor) == expected
    monkeypatch.setattr(linear_module, "onednn_available", lambda: False)
    assert linear_module.resolve_cpu_linear(mode, vendor) == "blas"  # a torch without oneDNN: the BLAS, always


def test_a_run_sets_the_backend_from_its_config_and_gpu_runs_keep_the_blas(backend, monkeypatch):
    from moa_train import parallel

    monkeypatch.setattr(linear_module, "onednn_available", lambda: True)
    monkeypatch.setattr(parallel.hardware, "cpu_vendor", lambda: "AuthenticAMD")
    parallel.configure_backends(torch.device("cpu"), reuse_freed_memory=False, cpu_linear="auto")
    assert linear_module.cpu_linear_backend() == "onednn"
    parallel.configure_backends(torch.device("meta"), cpu_linear="onednn")
    assert linear_module.cpu_linear_backend() == "blas"


def test_an_unknown_cpu_linear_is_refused_with_the_choices():
    with pytest.raises(ConfigError) as info:
        validate_config(compose_config("train.cpu_linear=mkl"))
    assert info.value.key == "train.cpu_linear"
    assert "auto, blas, onednn" in str(info.value)
