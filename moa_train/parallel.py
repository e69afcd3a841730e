"""Where the model meets the hardware: device, precision and compilation, applied in one place."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_context(device: torch.device, dtype: str):
    # bf16 autocast on GPU only: this CPU runs bf16 matmuls ~100x slower than float32.
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def configure_backends(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any float32 matmul left on GPU
        torch.backends.cudnn.allow_tf32 = True


def parallelize(model: nn.Module, device: torch.device, compile: bool | None) -> nn.Module:
    if compile is None:
        compile = device.type == "cuda"
    if compile:
        for block in model.layers:
            block.compile()  # per block: shorter compile, and FSDP units stay block-sized
    return model
