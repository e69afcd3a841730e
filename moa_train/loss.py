"""The output head and cross-entropy in one pass over chunks of tokens.

`F.cross_entropy(hidden @ weight.T, targets)` holds the whole (tokens, vocabulary) logits tensor, its
log-softmax and, in the backward pass, a zero-filled gradient of the same size: at 2,048 tokens and a
vocabulary of 8,192 that is three 64 MiB tensors and about a fifth of a small model's step on CPU.
Here each chunk of tokens has its logits computed, its loss summed and, when gradients are wanted, the
gradients of the hidden states and of the head's weight computed right away from softmax - one-hot
(the logits' gradient), so no tensor larger than (chunk, vocabulary) ever exists. The backward pass only
scales the stored gradients by the incoming one. The loss equals F.cross_entropy's to float rounding.

Two CPU measurements shape the arithmetic (docs/benchmarks.md): torch's float32 `exp` runs at about a
third of the rate of its `exp2` here, so the softmax's exponentials are taken in base 2; and MKL forms
the head's weight gradient (vocabulary x width, summed over the chunk's tokens) 1.0-1.7x faster as the
transpose of (width x vocabulary) when the width is small.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .linear import linear


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the head's matmuls run in: the autocast dtype when autocast is on, as nn.Linear would."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))

# Hidden widths up to which the head's weight gradient is formed transposed on CPU: 1.35x at width 16,
# 1.7x at 24, 1.4x at 40, 1.16x at 64, 1.01-1.05x at 128-256, but 0.98x at 384 and 0.95x at 768.
TRANSPOSED_WEIGHT_GRADIENT_MAX_WIDTH = 256


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, want_grad_hidden: bool, want_grad_weight: bool):
        n_tokens, width = hidden.shape
        dtype = _compute_dtype(hidden.device, hidden.dtype)
        transposed = hidden.device.type == "cpu" and width <= TRANSPOSED_WEIGHT_GRADIENT_MAX_WIDTH
        with torch.autocast(hidden.device.type, enabled=False):  # the casts below are autocast's, made explicit
            w = weight.to(dtype)
            loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
            grad_hidden = torch.empty_like(hidden) if want_grad_hidden else None
            grad_weight = None  # (width, vocabulary) when `transposed`
            if want_grad_weight:
                grad_weight = torch.zeros(weight.shape[::-1] if transposed else weight.shape,
                                          device=weight.device, dtype=torch.float32)
            for start in range(0, n_tokens, chunk):
                h = hidden[start:start + chunk].to(dtype)
                t = targets[start:start + chunk]
                logits = linear(h, w).float()  # oneDNN or the BLAS, as the model's other products (linear.py)
                target_logits = logits.gather(1, t[:, None]).squeeze(1)
                # One exp pass serves the loss and the gradient (logsumexp, then softmax, would take two)
                row_max = logits.amax(dim=-1, keepdim=True)
                exp = logits.sub_(row_max).mul_(LOG2E).exp2_()
                exp_sum = exp.sum(dim=-1)
                loss += (exp_sum.log() + row_max.squeeze(1) - target_logits).sum()
                if grad_hidden is None and grad_weight is None:
                    continue
                # d(mean loss)/d(logits) = (softmax - one_hot(target)) / n_tokens, built in place
                grad_logits = exp.mul_((1.0 / (exp_sum * n_tokens))[:, None])
                grad_logits[torch.arange(len(t), device=t.device), t] -= 1.0 / n_tokens
                grad_logits = grad_logits.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[start:start + chunk] = linear(grad_logits, w.t())
                if grad_weight is not None:
                    left, right = (h.t(), grad_logits) if transposed else (grad_logits.t(), h)
                    if dtype == torch.float32:
                        grad_weight.addmm_(left, right)
                    else:  # accumulated in float32 across chunks
                        grad_weight += left @ right
            if grad_weight is not None:
                grad_weight = (grad_weight.t().contiguous() if transposed else grad_weight).to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss / n_tokens

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden.mul_(grad_loss) if grad_hidden is not None else None,
                grad_weight.mul_(grad_loss) if grad_weight is not None else None, None, None, None, None)


# Logits elements per chunk when train.loss_chunk_tokens is null: a chunk's logits, 16 MiB in float32,
# stay near the CPU's caches; on GPU a chunk is large enough for full-rate matmuls (1 GiB).
AUTO_CHUNK_ELEMENTS = {"cpu": 2**22, "cuda": 2**28}


def chunk_tokens(configured: int | None, vocab_size: int, seq_len: int, device_type: str) -> int:
    """Tokens per chunk: `configured` (train.loss_chunk_tokens; 0 turns chunking off) or, when it is null,
    the power of two nearest below AUTO_CHUNK_ELEMENTS / vocab_size, made to divide a sequence or be a
    multiple of one (so every micro-batch is cut into equal chunks)."""
    if configured is not None:
        return configured
    target = max(1, AUTO_CHUNK_ELEMENTS.get(device_type, 2**22) // vocab_size)
    target = 1 << (target.bit_length() - 1)
    if target >= seq_len:
        return target // seq_len * seq_len
    return max(d for d in range(1, target + 1) if seq_len % d == 0)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int) -> torch.Tensor:
    """mean(cross_entropy(hidden @ weight.T, targets)) for hidden (N, D), weight (V, D), targets (N,),
    `chunk` tokens at a time (see the module docstring)."""
    grad_on = torch.is_grad_enabled()
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk, grad_on and hidden.requires_grad,
                                            grad_on and weight.requires_grad)
