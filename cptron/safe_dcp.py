"""Reading the DCP files of a checkpoint without trusting them: every read of a checkpoint's
`.metadata` and data files in cptron goes through this module.

torch's `FileSystemReader` unpickles `.metadata` with plain `pickle`, and its default load
planner unpickles non-tensor ("bytes") entries with `torch.load(weights_only=False)`; a
planted file could run any code through either. Here:

- `.metadata` is read by an unpickler that admits only the globals the DCP metadata of a
  cptron checkpoint holds (`ALLOWED_GLOBALS`, checked against a real checkpoint by
  tests/unit/test_checkpoint_safety.py); any other global is refused before it is looked up.
- Bytes entries are never read (`TensorOnlyLoadPlanner`). They may stay in a checkpoint (the
  trainer stores AdamW's hyperparameters as `optimizer.param_groups.*` for reference), but a
  model weight stored as one (`model.*`, always tensors) is refused on sight.
- Each data file is checked against the length the metadata expects, so a truncated
  `.distcp` or `.metadata` is named instead of surfacing as a bare EOFError inside DCP.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan

from cptron._torch_compat import dcp_file_extents
from cptron.errors import CheckpointError

METADATA_FILE = ".metadata"
TENSOR_ONLY_PREFIX = "model."
"""Keys that always hold tensors (the weights; `cptron.checkpoint.MODEL_PREFIX`)."""

# What torch's FileSystemWriter pickles into `.metadata` (torch 2.8-2.13), besides torch dtypes.
ALLOWED_GLOBALS: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset(
        {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorStorageMetadata",
            "TensorProperties",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",
            "_MEM_FORMAT_ENCODING",  # TensorProperties' memory format
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),  # a torch.layout pickles as _get_layout("torch.strided")
    "torch": frozenset({"Size"}),
    # StorageMeta.checkpoint_id; Python 3.13 moved the class to pathlib._local.
    "pathlib": frozenset({"PosixPath"}),
    "pathlib._local": frozenset({"PosixPath"}),
}


class _RefusedGlobal(Exception):
    def __init__(self, qualified: str):
        super().__init__(qualified)
        self.qualified = qualified


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = name in ALLOWED_GLOBALS.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        )
        if not allowed:
            raise _RefusedGlobal(f"{module}.{name}")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise _RefusedGlobal(f"persistent id {pid!r}")


def load_metadata_file(checkpoint: Path, name: str = METADATA_FILE) -> Metadata:
    """Unpickle the DCP metadata file `name` of `checkpoint` with the restricted unpickler."""
    file = checkpoint / name
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {checkpoint}: {file} is missing") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {checkpoint}: cannot read {file}: {e}") from e
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except _RefusedGlobal as e:
        raise CheckpointError(
            f"checkpoint {checkpoint}: {name} refers to {e.qualified}, which a cptron checkpoint never holds; "
            "refusing to load it"
        ) from None
    except Exception as e:  # truncated or corrupt: UnpicklingError, EOFError, and whatever the bytes decode to
        raise CheckpointError(
            f"checkpoint {checkpoint}: {file} is damaged (truncated or corrupt: {type(e).__name__}: {e})"
        ) from e
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(
            f"checkpoint {checkpoint}: {file} is damaged: it holds a {type(metadata).__name__}, not DCP metadata"
        )
    return metadata


def bytes_entry_refusal(checkpoint: Path, key: str) -> str:
    return (
        f"checkpoint {checkpoint}: {key} is stored as pickled bytes, not a tensor, which cptron never "
        "reads; refusing to load it"
    )


def read_dcp_metadata(checkpoint: str | os.PathLike) -> Metadata:
    """The DCP metadata of the checkpoint at `checkpoint`, read without running code; raises
    CheckpointError naming the file when it refers to a global outside `ALLOWED_GLOBALS` or
    stores a weight as bytes, or when a data file is missing or shorter than it says."""
    checkpoint = Path(checkpoint)
    metadata = load_metadata_file(checkpoint)
    for key, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, BytesStorageMetadata):
            if str(key).startswith(TENSOR_ONLY_PREFIX):
                raise CheckpointError(bytes_entry_refusal(checkpoint, key))
        elif not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(
                f"checkpoint {checkpoint}: {checkpoint / METADATA_FILE} is damaged: entry {key!r} is a "
                f"{type(entry).__name__}"
            )
    _check_data_files(checkpoint, metadata)
    return metadata


def _check_data_files(checkpoint: Path, metadata: Metadata) -> None:
    try:
        extents = dcp_file_extents(metadata)
    except (AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {checkpoint}: {checkpoint / METADATA_FILE} is damaged: its storage entries are malformed ({e})"
        ) from e
    for name, needed in sorted(extents.items()):
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name) or name.startswith("."):
            raise CheckpointError(
                f"checkpoint {checkpoint}: {METADATA_FILE} names the data file {name!r}, which is not a file "
                "inside the checkpoint; refusing to load it"
            )
        file = checkpoint / name
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {checkpoint}: data file {file} is missing") from None
        if size < needed:
            raise CheckpointError(
                f"checkpoint {checkpoint}: {file} is truncated: it holds {size} bytes, the metadata expects "
                f"at least {needed}"
            )


class SafeFileSystemReader(FileSystemReader):
    """torch's FileSystemReader, reading `.metadata` with the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # As torch's own, but without plain pickle (rank: DCP's fallback to per-rank metadata).
        rank = kwargs.get("rank")
        name = METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}"
        metadata = load_metadata_file(Path(self.path), name)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, refusing to read any bytes entry (torch would unpickle it
    with `torch.load(weights_only=False)`); tensors are read with `weights_only=True`."""

    def __init__(self, checkpoint: Path):
        super().__init__()
        self._checkpoint = checkpoint

    def create_local_plan(self) -> LoadPlan:
        plan = super().create_local_plan()
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                raise CheckpointError(bytes_entry_refusal(self._checkpoint, item.dest_index.fqn))
        return plan

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(bytes_entry_refusal(self._checkpoint, read_item.dest_index.fqn))
