"""The precision choice fits the hardware: bfloat16 only where the CPU computes it natively, a warning elsewhere."""

import warnings

import pytest
import torch

from improved_diffusion import precision


@pytest.fixture
def cpu(monkeypatch):
    """Set the reported ATen capability and bfloat16/AMX support; forget earlier warnings."""
    monkeypatch.setattr(precision, "_warned", set())
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)

    def set_cpu(capability, avx512_bf16, amx):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)

    return set_cpu


@pytest.mark.parametrize("capability, avx512_bf16, amx, native", [
    ("AVX512", True, False, True),
    ("AVX512", False, True, True),
    ("AVX512", False, False, False),
    ("AVX2", True, True, False),  # ATEN_CPU_CAPABILITY=avx2 caps the kernels
    ("DEFAULT", False, False, False),
])
def test_bf16_is_chosen_only_where_the_cpu_computes_it(cpu, capability, avx512_bf16, amx, native):
    cpu(capability, avx512_bf16, amx)
    assert precision.cpu_bf16_is_native() is native
    assert precision.auto_bf16("cpu") is native


def test_a_onednn_isa_cap_below_bf16_means_emulated(cpu, monkeypatch):
    cpu("AVX512", True, True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not precision.cpu_bf16_is_native()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert precision.cpu_bf16_is_native()


def test_emulated_bf16_warns_once_with_the_fix(cpu):
    cpu("AVX2", False, False)
    with pytest.warns(UserWarning, match="emulated.*Drop --use_bf16"):
        precision.warn_if_emulated_bf16("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precision.warn_if_emulated_bf16("cpu")


def test_native_bf16_does_not_warn(cpu):
    cpu("AVX512", True, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precision.warn_if_emulated_bf16("cpu")
