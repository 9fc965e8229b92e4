"""The cptron checkpoint format, shared by `cptron convert` and the trainer.

A checkpoint is one directory:

    <ckpt>/
      .metadata, __*_*.distcp    PyTorch DCP (torch.distributed.checkpoint) files
      cptron.json                format version, model config, step, HF config to export with
      tokenizer/                 tokenizer files carried along for export (optional)
      COMPLETE                   written last; a directory without it is never read

DCP keys are namespaced: model weights live under `model.<parameter name>` (the
names of `cptron.models.llama.Transformer`); the trainer adds `optimizer.*` beside
them and keeps its JSON train state in cptron.json (see `cptron.train.checkpointer`).
DCP stores each tensor with its global shape, so a checkpoint written under one
parallel layout loads under any other. Tied output weights are stored once, under
`model.tok_embeddings.weight`.

Writes are atomic: everything goes into `.<name>.incomplete` next to the target,
the metadata and then the COMPLETE marker are written and synced, then the
directory is renamed into place (an existing one is first moved to `.<name>.old`).
A crash at any point leaves the previous checkpoint, the new one, or both under
hidden names, which `recover_interrupted_write` resolves on the next read or write.
`write_checkpoint_async` writes the tensors in a background thread and adds the
marker once DCP reports every rank's files written; until then the directory stays hidden.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from cptron.distributed import barrier, get_rank, is_distributed, local_errors, raise_on_every_rank, run_on_rank0
from cptron.errors import CheckpointError, ConfigError, CptronError
from cptron.models.config import ModelConfig
from cptron.models.llama import build_model
from cptron.safe_dcp import SafeFileSystemReader, TensorOnlyLoadPlanner, read_dcp_metadata

FORMAT_VERSION = 1
META_FILE = "cptron.json"
COMPLETE_MARKER = "COMPLETE"
TOKENIZER_DIR = "tokenizer"
MODEL_PREFIX = "model."
STEP_DIR_RE = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    """Directory name of the trainer's checkpoint at `step` (sortable)."""
    return f"step-{step:08d}"


def is_complete(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / COMPLETE_MARKER).is_file() and (path / META_FILE).is_file()


def latest_complete_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    """The complete `step-N` directory under `root` with the largest N, or None.

    First repairs writes that were killed between their final renames (rank 0);
    collective when a process group is initialized.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    if get_rank() == 0:
        for hidden in root.glob(".step-*"):  # writes killed between their final renames
            m = re.match(r"^\.(step-\d+)\.(incomplete|old)$", hidden.name)
            if m:
                recover_interrupted_write(root / m.group(1))
    barrier()
    best: tuple[int, Path] | None = None
    for child in root.iterdir():
        m = STEP_DIR_RE.match(child.name)
        if m and child.is_dir() and is_complete(child):
            step = int(m.group(1))
            if best is None or step > best[0]:
                best = (step, child)
    return best[1] if best else None


def read_meta(path: str | os.PathLike) -> dict:
    """The `cptron.json` of a complete checkpoint; CheckpointError names what is wrong."""
    path = Path(path)
    if get_rank() == 0:
        recover_interrupted_write(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not (path / COMPLETE_MARKER).is_file():
        raise CheckpointError(
            f"checkpoint {path} is incomplete (no {COMPLETE_MARKER} marker): it was interrupted while being written"
        )
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {META_FILE}: {e}") from e
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format_version {version!r} is not supported "
            f"(this cptron reads version {FORMAT_VERSION})"
        )
    return meta


def tensor_metadata(path: str | os.PathLike) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Global shape and dtype of every tensor stored in the DCP checkpoint at `path`; a damaged or
    foreign `.metadata` or data file is a CheckpointError naming it (see `cptron.safe_dcp`)."""

    md = read_dcp_metadata(path)
    return {
        k: (v.size, v.properties.dtype)
        for k, v in md.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }


class _LazySavePlanner(DefaultSavePlanner):
    """Fetches each tensor only when DCP writes it, so a state dict of meta tensors
    (shapes and dtypes only) can be saved while holding one tensor at a time."""

    def __init__(self, fetch: Callable[[str], torch.Tensor]):
        super().__init__()
        self._fetch = fetch

    def resolve_data(self, write_item):
        fqn = write_item.index.fqn
        if write_item.type.name == "BYTE_IO":
            return super().resolve_data(write_item)
        return self._fetch(fqn)


def _describe(e: Exception) -> str:
    """The underlying per-rank errors of a DCP CheckpointException, or the error itself."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        errs = {r: (f[0] if isinstance(f, tuple) else f) for r, f in failures.items()}
        return "; ".join(f"rank {r}: {type(err).__name__}: {err}" for r, err in sorted(errs.items()))
    return f"{type(e).__name__}: {e}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def side_dirs(path: Path) -> tuple[Path, Path]:
    """The hidden siblings used while writing `path`: the new copy and the replaced one."""
    return path.parent / f".{path.name}.incomplete", path.parent / f".{path.name}.old"


def check_replaceable(path: Path, overwrite: bool, error: type[CptronError] = CptronError) -> None:
    """Refuse an existing output directory `path` unless `overwrite`, and a file there always:
    `replace_dir` replaces directories only (moved aside, a file would be lost)."""
    if path.exists() and not overwrite:
        raise error(f"{path} already exists; pass --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise error(f"{path} is a file, not an output directory: --overwrite replaces directories only")


def replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished directory `tmp` to `path`, replacing what is there.

    An existing `path` is first renamed to its `.old` sibling; a crash between the
    two renames leaves both copies, which `recover_interrupted_write` puts back.
    """
    _, old = side_dirs(path)
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)


def recover_interrupted_write(path: str | os.PathLike) -> None:
    """Finish or roll back a write of `path` that was killed during its final renames:
    a complete new copy is moved into place, else a complete replaced copy is restored."""
    path = Path(path)
    tmp, old = side_dirs(path)
    if not path.exists():
        if is_complete(tmp):
            os.replace(tmp, path)
        elif is_complete(old):
            os.replace(old, path)
    if path.exists() and old.exists():
        shutil.rmtree(old)


def _prepare_staging(path: Path, overwrite: bool) -> Path:
    """Collective: rank 0 readies the empty staging directory of `path`; returns it."""
    tmp, _ = side_dirs(path)

    def prepare():
        recover_interrupted_write(path)
        if path.exists() and not overwrite:
            raise CheckpointError(f"{path} already exists; pass overwrite to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # an incomplete write of a killed run; never read
        tmp.mkdir()

    run_on_rank0(prepare, f"preparing checkpoint {path}", CheckpointError)
    return tmp


def _finish_staged(path: Path, meta: dict, tokenizer_files: Optional[list[Path]]) -> None:
    """Rank 0 only, once every rank's tensors are on disk: add the tokenizer, the metadata
    and the COMPLETE marker to the staging directory, then move it into place."""
    tmp, _ = side_dirs(path)
    if tokenizer_files:
        (tmp / TOKENIZER_DIR).mkdir()
        for f in tokenizer_files:
            shutil.copy2(f, tmp / TOKENIZER_DIR / Path(f).name)
    _write_synced(tmp / META_FILE, json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2, sort_keys=True))
    _write_synced(tmp / COMPLETE_MARKER, "complete\n")  # last: marks everything above as durable
    _fsync_dir(tmp)
    replace_dir(tmp, path)


def write_checkpoint(
    path: str | os.PathLike,
    state_dict: dict[str, Any],
    meta: dict,
    fetch: Optional[Callable[[str], torch.Tensor]] = None,
    tokenizer_files: Optional[list[Path]] = None,
    overwrite: bool = False,
) -> Path:
    """Atomically write `state_dict` (DCP) plus `meta` to the checkpoint directory `path`.

    Collective when a process group is initialized: every rank passes its local
    shards; rank 0 prepares the directory, writes the metadata and renames, and a
    failure there is raised on every rank.
    `fetch(flat_key)`, when given, supplies each tensor at write time and the
    state dict only needs meta tensors (streaming conversion).
    `tokenizer_files` are copied into `<path>/tokenizer/`.
    """
    path = Path(path)
    tmp = _prepare_staging(path, overwrite)
    planner = _LazySavePlanner(fetch) if fetch is not None else DefaultSavePlanner()
    # One file per tensor when streaming: DCP keeps every tensor of a file alive
    # until the file is closed, which would defeat streaming.
    writer = FileSystemWriter(str(tmp), single_file_per_rank=fetch is None, sync_files=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        try:
            dcp.save(state_dict, storage_writer=writer, planner=planner)
        except (Exception, CheckpointException) as e:  # the partial directory stays hidden under its .incomplete name
            raise CheckpointError(f"writing checkpoint {path} failed: {_describe(e)}") from e

    run_on_rank0(lambda: _finish_staged(path, meta, tokenizer_files), f"finishing checkpoint {path}", CheckpointError)
    return path


class PendingCheckpointWrite:
    """A checkpoint whose tensors are being written in the background (`write_checkpoint_async`).

    Rank 0 finishes it on its own as soon as DCP reports success: DCP's coordinator
    (rank 0) only succeeds after every rank's files are written and synced and the
    `.metadata` is written, so no collective is needed for the COMPLETE marker and a
    crash of the training loop after that point keeps the checkpoint. Until then it is
    a hidden `.incomplete` directory that no reader looks at.
    """

    def __init__(
        self,
        path: Path,
        future,
        meta: dict,
        tokenizer_files: Optional[list[Path]],
        on_complete: Optional[Callable[[Path], None]],
        process_group=None,
    ):
        self.path = path
        self._error: Optional[str] = None
        # DCP's coordinator is rank 0 of the group that carried the write.
        distributed = is_distributed()
        self._coordinator = not distributed or dist.get_rank(process_group) == 0
        self._thread = threading.Thread(
            target=self._finish, args=(future, meta, tokenizer_files, on_complete), name=f"finish-{path.name}"
        )
        self._thread.start()

    def _finish(self, future, meta, tokenizer_files, on_complete) -> None:
        try:
            future.result()
        except (Exception, CheckpointException) as e:
            self._error = f"writing checkpoint {self.path} failed: {_describe(e)}"
            return
        if not self._coordinator:
            return
        try:
            _finish_staged(self.path, meta, tokenizer_files)
        except Exception as e:
            self._error = f"finishing checkpoint {self.path} failed: {type(e).__name__}: {e}"
            return
        if on_complete is not None:
            on_complete(self.path)  # must not raise: the checkpoint is already complete

    def done(self) -> bool:
        """True when this rank has nothing left to do for the write (not collective)."""
        return not self._thread.is_alive()

    def wait(self) -> Path:
        """Collective: block until the write is finished on every rank; a failure on any
        rank raises CheckpointError everywhere and leaves only the hidden staging directory."""
        self._thread.join()
        raise_on_every_rank(self._error, error_type=CheckpointError)
        return self.path


def write_checkpoint_async(
    path: str | os.PathLike,
    state_dict: dict[str, Any],
    meta: dict,
    tokenizer_files: Optional[list[Path]] = None,
    overwrite: bool = False,
    process_group=None,
    on_complete: Optional[Callable[[Path], None]] = None,
) -> PendingCheckpointWrite:
    """Like `write_checkpoint`, but returns once the tensors are copied to CPU memory; a
    background thread writes them (`dcp.async_save`) while the caller goes on changing
    the originals. Collective. `process_group` carries the background thread's
    collectives: give it a group of its own with a CPU backend (gloo), so they never
    interleave with the caller's collectives on the default group. `on_complete(path)`
    runs on rank 0 in the background once the checkpoint is complete.
    """
    path = Path(path)
    tmp = _prepare_staging(path, overwrite)
    writer = FileSystemWriter(str(tmp), single_file_per_rank=True, sync_files=True)
    error, future = None, None
    try:
        future = dcp.async_save(
            state_dict, storage_writer=writer, process_group=process_group, no_dist=not is_distributed()
        )
    except (Exception, CheckpointException) as e:
        error = f"starting the write of checkpoint {path} failed: {_describe(e)}"
    raise_on_every_rank(error, error_type=CheckpointError)
    return PendingCheckpointWrite(path, future, meta, tokenizer_files, on_complete, process_group)


def load_state(path: str | os.PathLike, state_dict: dict[str, Any]) -> None:
    """Load the entries of `state_dict` (a subset of the checkpoint is fine) in place.

    Tensors (plain or DTensor) receive their local shards, whatever layout wrote them.
    Collective when a process group is initialized. Only tensors are read: a bytes entry,
    a foreign `.metadata` or a truncated file is refused naming it (see `cptron.safe_dcp`).
    """
    path = Path(path)
    read_meta(path)  # refuses incomplete or foreign directories first
    # Checked here too, so that a damaged file is named on every rank before DCP starts.
    _, error = local_errors(lambda: read_dcp_metadata(path))
    raise_on_every_rank(error, error_type=CheckpointError)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        try:
            dcp.load(state_dict, storage_reader=SafeFileSystemReader(str(path)), planner=TensorOnlyLoadPlanner(path))
        except (Exception, CheckpointException) as e:
            own = _own_error(e)
            raise CheckpointError(own or f"loading checkpoint {path} failed: {_describe(e)}") from e


def _own_error(e: BaseException) -> Optional[str]:
    """The message of a CptronError that DCP wrapped in its CheckpointException (the first rank's)."""
    if isinstance(e, CptronError):
        return str(e)
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict):
        for _, failure in sorted(failures.items()):
            err = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(err, CptronError):
                return str(err)
    return None


def model_config_from_meta(meta: dict, path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """The validated ModelConfig stored in a checkpoint's cptron.json, with `overrides` of its fields
    (e.g. another pad_vocab_to_multiple_of)."""
    stored = meta.get("model")
    if not isinstance(stored, dict):
        raise CheckpointError(f"{Path(path) / META_FILE} has no model config")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(stored) - known)
    if unknown:
        raise CheckpointError(f"{Path(path) / META_FILE}: model fields {unknown} are not known to this cptron")
    try:
        cfg = ModelConfig(**{**stored, **overrides})
        cfg.validate()
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{Path(path) / META_FILE}: invalid model config: {e}") from e
    return cfg


def load_model(path: str | os.PathLike, device="cpu", dtype: Optional[torch.dtype] = None):
    """A whole (unsharded) model from the checkpoint at `path`, e.g. for evaluation or export checks.

    `dtype` None keeps the stored dtype of each tensor.
    """

    cfg = model_config_from_meta(read_meta(path), path)
    stored = tensor_metadata(path)
    key = "tok_embeddings.weight" if cfg.embedding_rank is None else "tok_embeddings.coordinates.weight"
    first = stored.get(MODEL_PREFIX + key)
    if first is None:
        raise CheckpointError(f"checkpoint {path} holds no model weights ({MODEL_PREFIX}{key})")
    model = build_model(cfg, seed=None, device=device, dtype=dtype or first[1])
    params = dict(model.named_parameters())
    load_state(path, {"model": params})
    return model
