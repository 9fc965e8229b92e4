"""The checkpoint directory format: atomic writes, completeness, newest-complete lookup."""
import json

import pytest
import torch

from cptron import checkpoint as ckpt
from cptron.errors import CheckpointError
from cptron.models.config import model_config_from_preset
from cptron.models.llama import build_model


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"model": {"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)}, "step": seed}


def test_write_then_load_round_trips(tmp_path):
    ckpt.write_checkpoint(tmp_path / "c", _state(1), {"step": 1})
    assert ckpt.is_complete(tmp_path / "c")
    assert ckpt.read_meta(tmp_path / "c")["step"] == 1
    target = {"model": {"a": torch.zeros(4, 3), "b": torch.zeros(5)}}
    ckpt.load_state(tmp_path / "c", target)
    assert torch.equal(target["model"]["a"], _state(1)["model"]["a"])
    assert ckpt.tensor_metadata(tmp_path / "c")["model.b"] == (torch.Size([5]), torch.float32)


def test_a_failed_write_leaves_no_checkpoint_and_the_next_write_recovers(tmp_path):
    state = {"model": {k: torch.empty(v.shape, device="meta") for k, v in _state()["model"].items()}}

    def broken_fetch(key):
        raise OSError("disk full")

    with pytest.raises(CheckpointError, match="step-00000005 failed: rank 0: OSError: disk full"):
        ckpt.write_checkpoint(tmp_path / "step-00000005", state, {"step": 5}, fetch=broken_fetch)
    assert not (tmp_path / "step-00000005").exists()
    assert ckpt.latest_complete_checkpoint(tmp_path) is None
    ckpt.write_checkpoint(tmp_path / "step-00000005", _state(5), {"step": 5})
    assert ckpt.latest_complete_checkpoint(tmp_path) == tmp_path / "step-00000005"
    assert not list(tmp_path.glob(".*incomplete"))


def test_newest_complete_checkpoint_skips_incomplete_and_foreign_dirs(tmp_path):
    for step in (10, 30):
        ckpt.write_checkpoint(tmp_path / ckpt.step_dir_name(step), _state(step), {"step": step})
    ckpt.write_checkpoint(tmp_path / ckpt.step_dir_name(50), _state(50), {"step": 50})
    (tmp_path / ckpt.step_dir_name(50) / ckpt.COMPLETE_MARKER).unlink()  # as if killed before the marker
    (tmp_path / "step-99999999x").mkdir()
    (tmp_path / ".step-00000070.incomplete").mkdir()
    assert ckpt.latest_complete_checkpoint(tmp_path) == tmp_path / "step-00000030"
    with pytest.raises(CheckpointError, match="step-00000050 is incomplete"):
        ckpt.read_meta(tmp_path / ckpt.step_dir_name(50))


def test_overwrite_replaces_and_refusal_keeps_the_old(tmp_path):
    ckpt.write_checkpoint(tmp_path / "c", _state(1), {"step": 1})
    with pytest.raises(CheckpointError, match="already exists"):
        ckpt.write_checkpoint(tmp_path / "c", _state(2), {"step": 2})
    assert ckpt.read_meta(tmp_path / "c")["step"] == 1
    ckpt.write_checkpoint(tmp_path / "c", _state(2), {"step": 2}, overwrite=True)
    assert ckpt.read_meta(tmp_path / "c")["step"] == 2


def test_foreign_format_version_and_missing_dir_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere does not exist"):
        ckpt.read_meta(tmp_path / "nowhere")
    ckpt.write_checkpoint(tmp_path / "c", _state(), {"step": 0})
    meta = json.loads((tmp_path / "c" / ckpt.META_FILE).read_text())
    meta["format_version"] = 99
    (tmp_path / "c" / ckpt.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version 99"):
        ckpt.read_meta(tmp_path / "c")


def test_loading_a_key_the_checkpoint_lacks_names_the_checkpoint(tmp_path):
    ckpt.write_checkpoint(tmp_path / "c", _state(), {"step": 0})
    with pytest.raises(CheckpointError, match=r"loading checkpoint .*c failed"):
        ckpt.load_state(tmp_path / "c", {"model": {"zzz": torch.zeros(1)}})


def test_load_model_restores_tied_weights(tmp_path):
    import dataclasses

    cfg = model_config_from_preset("tiny", tie_embeddings=True)
    model = build_model(cfg, seed=5)
    params = {n: p.detach() for n, p in model.named_parameters()}
    ckpt.write_checkpoint(tmp_path / "c", {"model": params}, {"model": dataclasses.asdict(cfg)})
    assert "model.output.weight" not in ckpt.tensor_metadata(tmp_path / "c")
    loaded = ckpt.load_model(tmp_path / "c")
    assert loaded.output.weight is loaded.tok_embeddings.weight
    x = torch.randint(0, cfg.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("crash_at", [1, 2])
def test_a_crash_during_the_final_renames_of_an_overwrite_is_recovered(tmp_path, monkeypatch, crash_at):
    import os

    target = tmp_path / ckpt.step_dir_name(100)
    ckpt.write_checkpoint(target, _state(1), {"step": 1})
    real_replace, calls = os.replace, []

    def dying_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == crash_at:
            raise KeyboardInterrupt("killed")  # as if SIGKILLed between the renames
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        ckpt.write_checkpoint(target, _state(2), {"step": 2}, overwrite=True)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    # crash 1: old still in place; crash 2: old moved aside and the new copy complete but hidden
    assert target.exists() == (crash_at == 1)
    assert ckpt.latest_complete_checkpoint(tmp_path) == target
    assert ckpt.read_meta(target)["step"] == (1 if crash_at == 1 else 2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == \
        ([".step-00000100.incomplete"] if crash_at == 1 else [])


def test_a_complete_old_copy_is_restored_when_the_new_one_never_finished(tmp_path):
    target = tmp_path / "c"
    ckpt.write_checkpoint(target, _state(1), {"step": 1})
    tmp, old = target.parent / ".c.incomplete", target.parent / ".c.old"
    target.rename(old)
    tmp.mkdir()  # the new copy died before its COMPLETE marker
    assert ckpt.read_meta(target)["step"] == 1
    assert not old.exists()


def test_metadata_is_written_before_the_marker(tmp_path, monkeypatch):
    order = []
    real = ckpt._write_synced
    monkeypatch.setattr(ckpt, "_write_synced", lambda p, t: (order.append(p.name), real(p, t)))
    ckpt.write_checkpoint(tmp_path / "c", _state(), {"step": 0})
    assert order == [ckpt.META_FILE, ckpt.COMPLETE_MARKER]


def test_check_replaceable_refuses_an_existing_output_and_always_a_file(tmp_path):
    from cptron.checkpoint import check_replaceable
    from cptron.errors import ConversionError, CptronError

    check_replaceable(tmp_path / "new", overwrite=False)  # nothing there: fine
    (tmp_path / "dir").mkdir()
    with pytest.raises(CptronError, match="already exists; pass --overwrite"):
        check_replaceable(tmp_path / "dir", overwrite=False)
    check_replaceable(tmp_path / "dir", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConversionError, match="is a file, not an output directory"):
        check_replaceable(tmp_path / "file", overwrite=True, error=ConversionError)
