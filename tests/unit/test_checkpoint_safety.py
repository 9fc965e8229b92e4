"""Reading a checkpoint runs no code from it, and a damaged one is named (cptron.safe_dcp).

A planted `.metadata` or bytes entry must not run, through every path that reads a
checkpoint: the cptron.checkpoint functions of convert/verify, the CLI, a resume
(TrainCheckpointer.load) and checkpoint.init_from. A truncated `.metadata` or `.distcp` is a
one-line CheckpointError naming the file, and on resume the older checkpoint to roll back to.
"""
import io
import os
import pickle
import sys

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

from cptron import checkpoint as ckpt
from cptron import safe_dcp
from cptron.cli import main
from cptron.errors import CheckpointError, CptronError
from cptron.hf import compare_with_transformers, convert_cptron_to_hf
from cptron.models.config import model_config_from_preset
from cptron.models.llama import build_model
from cptron.train.checkpointer import CheckpointConfig, TrainCheckpointer
from cptron.train.initial_weights import load_initial_weights

CFG = model_config_from_preset("tiny", vocab_size=500, pad_vocab_to_multiple_of=64)
STATE = {"step": 1, "data": {"epoch": 0, "offset": 3}}


class _Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _model_and_optimizer(seed=0):
    model = build_model(CFG, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, CFG.vocab_size, (1, 8))).float().mean().backward()
    opt.step()
    return model, opt


def _save(tmp_path, *steps):
    """The trainer's checkpoints of `steps` under tmp_path/run; returns their paths."""
    cp = TrainCheckpointer(CheckpointConfig(keep_last=0), tmp_path / "run", model_cfg=CFG)
    model, opt = _model_and_optimizer()
    return [cp.save(s, [model], [opt], {**STATE, "step": s}) for s in steps]


def _raw_metadata(path):
    with open(path / ".metadata", "rb") as f:
        return pickle.load(f)  # the test's own, trusted checkpoint


def _plant_metadata_payload(path, marker):
    md = _raw_metadata(path)
    md.storage_meta = _Payload(marker)  # nested deep inside otherwise genuine metadata
    (path / ".metadata").write_bytes(pickle.dumps(md))


def _plant_bytes_payload(path, key, marker):
    """Make `key` a bytes entry whose data is a torch.save'd payload, as DCP stores non-tensors."""
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    (path / "__9_0.distcp").write_bytes(buf.getvalue())
    md = _raw_metadata(path)
    md.state_dict_metadata[key] = BytesStorageMetadata()
    md.storage_data = {i: s for i, s in md.storage_data.items() if i.fqn != key}
    md.storage_data[MetadataIndex(key)] = _StorageInfo("__9_0.distcp", 0, len(buf.getvalue()))
    (path / ".metadata").write_bytes(pickle.dumps(md))


def _resume(path):
    cp = TrainCheckpointer(CheckpointConfig(), path.parent.parent, model_cfg=CFG)
    model, opt = _model_and_optimizer(seed=1)
    return cp.load(path, [model], [opt])


def _init_from(path):
    load_initial_weights(path, [build_model(CFG, seed=1)], CFG)


def _readers(tmp_path):
    """(name, read) for every way cptron reads a checkpoint."""
    return [
        ("tensor_metadata", ckpt.tensor_metadata),
        ("load_model", ckpt.load_model),
        ("convert_cptron_to_hf", lambda p: convert_cptron_to_hf(p, tmp_path / "hf_out", progress=False)),
        ("resume", _resume),
        ("init_from", _init_from),
    ]


def _cli_export(path, out, capsys):
    capsys.readouterr()
    code = main(["convert", "cptron-to-hf", "--input", str(path), "--output", str(out), "--progress", "false"])
    return code, capsys.readouterr().err


def test_planted_metadata_runs_nothing_on_any_read_path(tmp_path, capsys):
    (path,) = _save(tmp_path, 1)
    marker = tmp_path / "pwned"
    _plant_metadata_payload(path, marker)
    for name, read in _readers(tmp_path):
        with pytest.raises(CheckpointError) as info:
            read(path)
        message = str(info.value)
        assert f"checkpoint {path}: .metadata refers to posix.system" in message, (name, message)
        assert "refusing to load it" in message and "\n" not in message, name
        assert not marker.exists(), f"{name} ran the planted .metadata"
    code, err = _cli_export(path, tmp_path / "hf_cli", capsys)
    assert code == 2 and ".metadata refers to posix.system" in err and str(path) in err
    assert not marker.exists() and not (tmp_path / "hf_cli").exists()


def test_the_metadata_safety_check_runs_inside_dcp_load_too(tmp_path):
    (path,) = _save(tmp_path, 1)
    marker = tmp_path / "pwned"
    _plant_metadata_payload(path, marker)
    with pytest.raises(CheckpointError, match=r"\.metadata refers to posix\.system"):
        safe_dcp.SafeFileSystemReader(str(path)).read_metadata()
    (path / ".metadata").rename(path / "__0.metadata")  # DCP's fallback: per-rank metadata
    with pytest.raises(CheckpointError, match=r"__0\.metadata refers to posix\.system"):
        safe_dcp.SafeFileSystemReader(str(path)).read_metadata(rank=0)
    assert not marker.exists()


def test_a_payload_in_a_bytes_entry_runs_nothing(tmp_path, capsys):
    (path,) = _save(tmp_path, 1)
    marker = tmp_path / "pwned"
    _plant_bytes_payload(path, "model.norm.weight", marker)
    for name, read in _readers(tmp_path):
        with pytest.raises(CheckpointError, match="model.norm.weight is stored as pickled bytes") as info:
            read(path)
        assert str(path) in str(info.value), name
        assert not marker.exists(), f"{name} unpickled the bytes entry"
    code, err = _cli_export(path, tmp_path / "hf_cli", capsys)
    assert code == 2 and "model.norm.weight is stored as pickled bytes" in err
    assert not marker.exists()


def test_optimizer_hyperparameter_bytes_are_kept_but_never_read(tmp_path):
    # The trainer writes AdamW's hyperparameters as bytes entries (for reference): a resume
    # leaves them alone, and reading one on purpose is refused rather than unpickled.
    (path,) = _save(tmp_path, 1)
    key = "optimizer.param_groups.norm.weight.lr"
    assert isinstance(_raw_metadata(path).state_dict_metadata[key], BytesStorageMetadata)
    marker = tmp_path / "pwned"
    _plant_bytes_payload(path, key, marker)
    assert _resume(path) == STATE
    with pytest.raises(CheckpointError, match=f"{key} is stored as pickled bytes"):
        ckpt.load_state(path, {key: 0.0})
    assert not marker.exists()


def test_allowed_globals_are_exactly_what_a_trainer_checkpoint_pickles(tmp_path):
    (path,) = _save(tmp_path, 1)
    seen = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    Recording(io.BytesIO((path / ".metadata").read_bytes())).load()
    allowed = {(m, n) for m, names in safe_dcp.ALLOWED_GLOBALS.items() for n in names}
    dtypes = {(m, n) for m, n in seen if m == "torch" and isinstance(getattr(torch, n), torch.dtype)}
    assert seen - dtypes <= allowed
    # Minimal: nothing unused, but the other spelling of the path class (Python >= 3.13 or not).
    alias = ("pathlib", "PosixPath") if sys.version_info >= (3, 13) else ("pathlib._local", "PosixPath")
    assert allowed - {alias} == seen - dtypes


@pytest.mark.parametrize("damage", ["metadata", "distcp"])
def test_a_truncated_newest_checkpoint_names_the_file_and_the_step_to_roll_back_to(tmp_path, damage):
    older, newest = _save(tmp_path, 1, 2)
    file = newest / (".metadata" if damage == "metadata" else "__0_0.distcp")
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    expected = f"{file} is damaged (truncated or corrupt" if damage == "metadata" else f"{file} is truncated"
    with pytest.raises(CheckpointError) as info:
        _resume(newest)
    message = str(info.value)
    assert expected in message and "\n" not in message, message
    assert f"the older checkpoint {older} is intact: roll back to it with checkpoint.load_step=1" in message
    assert _resume(older) == STATE  # the hint's checkpoint does load
    for name, read in _readers(tmp_path):
        if name != "resume":
            with pytest.raises(CheckpointError, match=str(file)):
                read(newest)


def test_a_truncated_checkpoint_without_an_intact_older_one_says_so(tmp_path):
    older, newest = _save(tmp_path, 1, 2)
    for path in (older, newest):
        data = path / "__0_0.distcp"
        data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="holds no older intact checkpoint to roll back to"):
        _resume(newest)


def test_export_and_verify_of_a_truncated_checkpoint_exit_2_naming_the_file(tmp_path, capsys):
    (path,) = _save(tmp_path, 1)
    assert _cli_export(path, tmp_path / "hf", capsys)[0] == 0
    for name in (".metadata", "__0_0.distcp"):
        file = path / name
        intact = file.read_bytes()
        file.write_bytes(intact[:-7])
        code, err = _cli_export(path, tmp_path / f"hf{name}", capsys)
        assert code == 2 and str(file) in err and len(err.strip().splitlines()) == 1, err
        code = main(["convert", "verify", "--checkpoint", str(path), "--hf", str(tmp_path / "hf")])
        assert code == 2 and str(file) in capsys.readouterr().err
        file.write_bytes(intact)
    assert compare_with_transformers(path, tmp_path / "hf") < 1e-4  # intact again: both work


def test_a_data_file_outside_the_checkpoint_is_refused(tmp_path):
    (path,) = _save(tmp_path, 1)
    md = _raw_metadata(path)
    index = next(iter(md.storage_data))
    md.storage_data[index] = _StorageInfo("../../elsewhere.distcp", 0, 4)
    (path / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CptronError, match=r"names the data file '\.\./\.\./elsewhere\.distcp'"):
        ckpt.tensor_metadata(path)
