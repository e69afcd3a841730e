"""Linear layers (x @ W.T) on CPU through oneDNN or through torch's BLAS.

torch runs a float32 `F.linear` on CPU through its BLAS: Intel's MKL in the x86 wheels. MKL picks its
code path by CPU vendor, and on AMD it takes a generic one (its verbose mode names "Intel(R) Architecture
processors", not AVX-512): on a 2-core AMD EPYC (Zen 4) oneDNN, which torch also ships, ran the same
float32 products of the peers benchmark's shapes 1.1-1.2x faster (docs/benchmarks.md). So with
`train.cpu_linear=onednn` (by default on a CPU that is not Intel's) the model's linear layers and the
output head (loss.py) run their forward product and the input gradient's through oneDNN. The weight
gradient, a product over all tokens, stays with the BLAS: oneDNN ran it at 0.6-0.85x in the same form,
and at 0.96-1.06x with both operands transposed, not enough for a path of its own. Both are float32
throughout: the results differ from the BLAS's in rounding only (the order of the sums), as those of two
BLAS builds do.

The switch is process-wide, as torch's own backend flags are (configure_backends sets it from the run's
config); it applies to float32 CPU tensors outside autocast, and every other call is plain `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_backend = "blas"  # the one in use: "blas" | "onednn"


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def resolve_cpu_linear(mode: str, cpu_vendor: str = "") -> str:
    """auto: oneDNN where it is built in and the CPU's vendor (hardware.cpu_vendor) is known and not Intel
    (whose MKL takes its fast path), else the BLAS; onednn where it is not built in falls back to the BLAS."""
    if mode == "auto":
        mode = "onednn" if cpu_vendor not in ("GenuineIntel", "") else "blas"
    return "onednn" if mode == "onednn" and onednn_available() else "blas"


def set_cpu_linear(mode: str, cpu_vendor: str = "") -> str:
    """Use `mode` (auto | blas | onednn: config.CPU_LINEAR) for this process's CPU linear layers from now on;
    returns the one in use."""
    global _backend
    _backend = resolve_cpu_linear(mode, cpu_vendor)
    return _backend


def cpu_linear_backend() -> str:
    return _backend


@torch.library.custom_op("moa_train::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T by oneDNN, for any leading dims of x and strided operands; as a custom op, torch.compile
    calls it as it is instead of tracing into the kernel."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


@onednn_linear.register_fake
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _save_operands(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _onednn_linear_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x = onednn_linear(grad, weight.t()) if ctx.needs_input_grad[0] else None
    grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1]) \
        if ctx.needs_input_grad[1] else None  # the BLAS: see the module docstring
    return grad_x, grad_weight


onednn_linear.register_autograd(_onednn_linear_backward, setup_context=_save_operands)


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_backend == "onednn" and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through oneDNN where set_cpu_linear chose it and the operands are float32 on CPU."""
    if _use_onednn(x, weight):
        y = onednn_linear(x, weight)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (the same parameters and state dict) whose product is `linear`'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
