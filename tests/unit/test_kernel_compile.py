"""Compile the CUDA sources of csrc/ here, without a GPU, so a syntax or template error fails CI.

The kernels (.cu) are plain CUDA C++: nvcc compiles them alone (-c) for sm_80 and sm_90 with the
flags the extension build uses (torch's COMMON_NVCC_FLAGS, -std=c++20, cptron/kernels/build.py),
warnings as errors. The torch binding (.cpp) needs a CUDA build of torch to link; with the CPU
build installed here it is type-checked only (g++ -fsyntax-only against torch's headers; the one
generated CUDA header a CPU wheel lacks is stubbed). Both are skipped when the compiler is missing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from cptron.kernels import build

NVCC = shutil.which("nvcc")


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_kernels_compile_for_ampere_and_hopper(tmp_path):
    for source in build.sources(build.KERNEL_SOURCES):
        flags = cpp_extension.COMMON_NVCC_FLAGS + ["-std=c++20", *build.NVCC_FLAGS, "-Werror", "all-warnings"]
        archs = [build.gencode(arch) for arch in build.ARCHS]
        _run([NVCC, *flags, *archs, "-c", source, "-o", str(tmp_path / (Path(source).stem + ".o"))])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
def test_torch_binding_type_checks_against_torch_headers(tmp_path):
    torch_include = Path(cpp_extension.include_paths()[0])
    if not (torch_include / "c10/cuda/CUDAGuard.h").exists():
        pytest.skip("this torch ships no c10/cuda headers")
    homes = [cpp_extension.CUDA_HOME, str(Path(NVCC).resolve().parents[1]) if NVCC else None, "/usr/local/cuda"]
    cuda_home = next((h for h in homes if h and (Path(h) / "include/cuda_runtime.h").exists()), None)
    if cuda_home is None:
        pytest.skip("no CUDA toolkit headers")
    stub = tmp_path / "stub/c10/cuda/impl/cuda_cmake_macros.h"  # generated at torch's build; absent from CPU wheels
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    includes = [f"-I{tmp_path / 'stub'}", *(f"-I{p}" for p in cpp_extension.include_paths())]
    includes += [f"-I{sysconfig.get_paths()['include']}", f"-I{Path(cuda_home) / 'include'}", f"-I{build.CSRC}"]
    for source in build.sources(build.BINDING_SOURCES):
        _run(
            [
                "g++",
                "-std=c++20",
                "-fsyntax-only",
                "-Wall",
                "-Werror",
                *includes,
                "-DTORCH_EXTENSION_NAME=fe_check",
                "-DTORCH_API_INCLUDE_EXTENSION_H",
                f"-DPYTHON_VERSION={sys.version_info.major}",
                source,
            ]
        )
