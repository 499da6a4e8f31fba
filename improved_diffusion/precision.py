"""
Which precision fits the hardware. bfloat16 autocast is fast on GPUs that
support it and on CPUs that compute it natively (AVX512-BF16 or AMX); on other
CPUs PyTorch emulates it, and a training step of a small UNet was measured
13.5x slower than in float32 (2-core AMD EPYC, AVX2 only).
"""

import os
import warnings

import torch

# ONEDNN_MAX_CPU_ISA values that still let oneDNN use bfloat16 instructions.
_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_AMX", "AVX10", "ALL")
_warned = set()


def cpu_bf16_is_native():
    """
    True where this CPU computes bfloat16 in hardware and PyTorch may use it:
    AVX512-BF16 or AMX present, ATen's kernels not capped below AVX-512
    (ATEN_CPU_CAPABILITY) and oneDNN not capped below its bfloat16 ISAs
    (ONEDNN_MAX_CPU_ISA).
    """
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa and not isa.startswith(_BF16_ISAS):
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def auto_bf16(device):
    """Whether to pick bfloat16 autocast by default on `device` (a torch.device or string)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_bf16_is_native()


def warn_if_emulated_bf16(device):
    """Warn once per process when bfloat16 autocast on a CPU `device` would be emulated."""
    if torch.device(device).type != "cpu" or cpu_bf16_is_native() or "cpu" in _warned:
        return
    _warned.add("cpu")
    warnings.warn(
        f"--use_bf16 True on a CPU without native bfloat16 (PyTorch reports "
        f"{torch.backends.cpu.get_cpu_capability()}, no AVX512-BF16 or AMX in use): bfloat16 is emulated, "
        "and a training step can be ~10x slower than float32 (13.5x measured on an AVX2-only CPU). "
        "Drop --use_bf16 (float32) on this machine.",
        stacklevel=2,
    )
