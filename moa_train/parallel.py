"""Where the model meets the hardware: precision, compilation and data parallelism, in one place.

Order matters and follows torchtitan: activation checkpointing of the chosen blocks, then compile each
block, then shard (FSDP2 `fully_shard` per block and on the root) or replicate (DDP). The model file
knows nothing of any of it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import subprocess
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from . import hardware
from .distributed import DistEnv
from .linear import set_cpu_linear
from .utils import read_machine_cache, recomputing, write_machine_cache


def use_bf16(device: torch.device, dtype: str) -> bool:
    # bf16 on GPU only by default: this CPU runs bf16 matmuls ~100x slower than float32.
    return dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")


def autocast_context(device: torch.device, dtype: str, mode: str = "none"):
    # FSDP2 casts parameters itself (MixedPrecisionPolicy); autocast is for none/ddp.
    if use_bf16(device, dtype) and mode != "fsdp":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def configure_backends(device: torch.device, threads: int | None = None, reuse_freed_memory: bool = True,
                       cpu_linear: str = "auto") -> None:
    # oneDNN or the BLAS for the CPU's products (linear.py)
    set_cpu_linear(cpu_linear if device.type == "cpu" else "blas", hardware.cpu_vendor())
    if threads:  # parallel sweep jobs share the cores: one thread each instead of all cores each
        torch.set_num_threads(threads)
    if device.type == "cpu" and reuse_freed_memory:  # no page faults for each step's new tensors (hardware.py)
        hardware.reuse_freed_memory()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any float32 matmul left on GPU
        torch.backends.cudnn.allow_tf32 = True


def allow_recompiles(limit: int = 64) -> None:
    """Each MoA dictionary is one more specialisation of the same fused kernel body (ffn/kernels.py):
    allow that many before dynamo gives up and runs it eagerly."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, getattr(torch._dynamo.config, name)))


def cache_compiled_autograd_functions() -> None:
    """Let AOTAutograd's on-disk cache keep graphs that hold the MoA mixing kernels' autograd Functions
    (ffn/kernels.py), which it bypasses by default. Their forward and backward are traced into the graph
    that keys the cache, and they close over no state, so a cached graph is the one a trace would give.
    A process that compiles an architecture another process has compiled (a sweep's parallel jobs)
    then compiles a training step in 0.6 s instead of 2.2 s (`dense_80k` qd_moa, docs/benchmarks.md)."""
    if hasattr(torch._functorch.config, "autograd_cache_allow_custom_autograd_functions"):
        torch._functorch.config.autograd_cache_allow_custom_autograd_functions = True


VECTOR_ISA_FILE = "inductor-vector-isa.json"


def remember_vector_isa_checks(directory: Path) -> None:
    """Inductor checks, in each process that compiles for the CPU, which vector instruction sets (AVX2, AVX-512,
    AMX, ...) its C++ compiler can build and load: about ten test programs, compiled once per inductor cache (8 s
    after it is emptied) and each loaded in a fresh Python process every time (1.5 s a process, paid by every run
    that compiles a block or an MoA kernel). The outcome depends on the CPU, the compiler and torch only, so a
    passed check is remembered per machine beside the data cache (`directory`), as the matmul peak is
    (hardware.py); a check that failed, or is not remembered, runs as inductor runs it."""
    try:
        from torch._inductor.cpu_vec_isa import VecISA
    except ImportError:  # another torch: its own checks
        return
    check = getattr(VecISA, "check_build", None)
    if check is None or getattr(check, "remembered_in", None) is not None:
        return
    path = directory / VECTOR_ISA_FILE

    def remembered(isa, code: str) -> bool:
        key = f"{type(isa).__name__} | {isa.build_arch_flags()} | {hashlib.sha256(code.encode()).hexdigest()[:16]}"
        machine = _compiler_machine_key()
        known = read_machine_cache(path)
        if known.get(machine, {}).get(key) is True:
            return True
        passed = check(isa, code)
        if passed:  # only a pass: a failure may be passing trouble (a full disk), not the machine
            write_machine_cache(path, {**known, machine: {**known.get(machine, {}), key: True}})
        return passed

    remembered.remembered_in = path
    VecISA.check_build = remembered


@functools.cache
def _compiler_machine_key() -> str:
    """The CPU (its model and feature flags), the C++ compiler inductor calls (its path and version) and torch."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    compiler = get_cpp_compiler()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    flags = hardware.cpu_flags()
    return (f"{hardware.cpu_name()} | flags {hashlib.sha256(flags.encode()).hexdigest()[:12]} | {compiler} "
            f"{version.splitlines()[0] if version else '?'} | torch {torch.__version__}")


def checkpointed_blocks(n_layers: int, mode: str, every: int) -> list[int]:
    """The blocks whose activations are recomputed in the backward pass: none, all (full), or every
    `every`-th block (selective; the last of each group, so a model of fewer blocks keeps them all)."""
    if mode == "full":
        return list(range(n_layers))
    if mode == "selective":
        return [i for i in range(n_layers) if (i + 1) % every == 0]
    return []


def _recompute_contexts():
    return contextlib.nullcontext(), recomputing()


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2) -> list[int]:
    """Keep only each chosen block's input in the forward pass and recompute the rest in the backward: less
    memory for one more forward of those blocks. The block's forward is replaced on the instance, so
    parameter names, checkpoints and exports are those of a model without it. Forward side effects (the MoE
    load counts) are skipped in the recomputation (utils.recomputing)."""
    chosen = checkpointed_blocks(len(model.layers), mode, every)
    for i in chosen:
        block = model.layers[i]
        # Only a block with side effects gets the recomputation flag: torch.compile traces the default contexts
        side_effects = any(getattr(m, "has_forward_side_effects", False) for m in block.modules())
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False,
                                          **({"context_fn": _recompute_contexts} if side_effects else {}))
    return chosen


def parallelize(model: nn.Module, env: DistEnv, compile: bool | None, dtype: str = "auto",
                activation_checkpointing: str = "none", checkpoint_every: int = 2) -> nn.Module:
    allow_recompiles()
    cache_compiled_autograd_functions()
    apply_activation_checkpointing(model, activation_checkpointing, checkpoint_every)
    if compile is None:
        compile = env.device.type == "cuda"
    if compile:
        for block in model.layers:
            block.compile()  # per block: shorter compile, and FSDP units stay block-sized
    if env.mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if use_bf16(env.device, dtype) else MixedPrecisionPolicy()
        for block in model.layers:
            fully_shard(block, mp_policy=policy)
        # The root leaves its inputs as they come: a vision model's images stay float32 for its targets (it
        # casts its own patch embedding's input); token ids are integers, which no policy casts anyway.
        root_policy = MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=policy.reduce_dtype,
                                           cast_forward_inputs=False)
        fully_shard(model, mp_policy=root_policy)
    elif env.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # broadcast_buffers=False: buffers are kept equal by construction (MoE biases follow all-reduced
        # loads), and per-rank counters such as the MoE loads must not be overwritten by rank 0's
        model = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                        broadcast_buffers=False)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The Transformer itself (DDP wraps it; FSDP2 does not)."""
    return model.module if hasattr(model, "module") else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of a step."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def gradient_norm(model: nn.Module, max_norm: float) -> float:
    """The global gradient norm, the gradients clipped to max_norm when it is > 0 (0: measured only, for the
    divergence check)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    else:
        norm = torch.nn.utils.get_total_norm(grads)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
        norm = norm.full_tensor()
    return norm.item()
