"""Markers shared by every test.

gpu          needs CUDA; skipped automatically where torch.cuda.is_available() is False.
slow         takes over 30 s; runs by default (deselect with -m "not slow").
distributed  runs several ranks through cptron.testing.distributed; set on every
             test under tests/distributed/ automatically (deselect with -m "not distributed").
"""

import os
from pathlib import Path

import pytest

# Every test runs in one process that the distributed harness forks. The
# default torch.cuda.is_available() initializes the CUDA driver, after which no
# forked rank can use CUDA; with this set it asks NVML and leaves CUDA alone.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

_DISTRIBUTED_DIR = Path(__file__).parent / "distributed"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: needs CUDA; skipped automatically when torch.cuda.is_available() is False"
    )
    config.addinivalue_line("markers", "slow: takes over 30 s; runs by default")
    config.addinivalue_line(
        "markers", "distributed: multi-process test run through cptron.testing.distributed"
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _DISTRIBUTED_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.distributed)

    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch  # only when a gpu test was collected

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)
