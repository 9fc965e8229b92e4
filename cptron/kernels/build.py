"""Where the CUDA sources are and how they are compiled: one home for setup.py, the JIT build and the
nvcc compile test. Imports nothing from cptron or torch, so setup.py can load it by path."""

from __future__ import annotations

from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"
"""The sources; present in a source checkout (an editable install), not inside a wheel."""

EXTENSION_NAME = "cptron.kernels._factorized_embedding_cuda"
"""The module setup.py builds; the JIT build loads the same sources under JIT_NAME."""

JIT_NAME = "cptron_factorized_embedding_jit"

BINDING_SOURCES = ("factorized_embedding.cpp",)
"""Torch bindings: they need a CUDA build of torch to compile."""

KERNEL_SOURCES = ("factorized_embedding_kernels.cu",)
"""Kernels: plain CUDA C++, compiled alone by tests/unit/test_kernel_compile.py."""

CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "-lineinfo"]
"""On top of torch's own (cpp_extension.COMMON_NVCC_FLAGS, -std=c++20, the arch flags). No fast-math:
the kernels promise fp32-accurate accumulation."""

ARCHS = ("8.0", "9.0")
"""Compute capabilities built by setup.py when TORCH_CUDA_ARCH_LIST is unset. The bf16 tensor-core
path needs 8.0 (Ampere) or newer."""


def gencode(arch: str) -> str:
    """nvcc's flag for one compute capability, e.g. "9.0" -> -gencode=arch=compute_90,code=sm_90."""
    cc = arch.replace(".", "")
    return f"-gencode=arch=compute_{cc},code=sm_{cc}"


def sources(names: tuple[str, ...] = BINDING_SOURCES + KERNEL_SOURCES) -> list[str]:
    return [str(CSRC / name) for name in names]
