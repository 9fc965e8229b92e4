"""Training checkpoints in one process: exact resume, layout, pruning, async saves, crashes,
initial weights from Hugging Face and cptron checkpoints."""
import copy
import dataclasses
import json
import multiprocessing
import os
import signal
import time

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint import FileSystemWriter

from cptron import checkpoint as ckpt
from cptron.errors import CheckpointError, ConfigError
from cptron.hf import convert_cptron_to_hf, convert_hf_to_cptron
from cptron.models.config import model_config_from_preset
from cptron.models.llama import build_model
from cptron.train.checkpointer import CheckpointConfig, TrainCheckpointer
from cptron.train.initial_weights import load_initial_weights, model_config_for_init

CFG = model_config_from_preset("tiny", vocab_size=500, pad_vocab_to_multiple_of=64, tie_embeddings=True)
HF_VOCAB = 300


def _trained(seed=0, steps=1, cfg=CFG):
    """A model and AdamW after `steps` real steps (so every state tensor is non-trivial)."""
    model = build_model(cfg, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen)
        model(tokens).float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _checkpointer(tmp_path, **kw):
    return TrainCheckpointer(CheckpointConfig(**kw), tmp_path / "run", model_cfg=CFG)


def _assert_same(model_a, opt_a, model_b, opt_b):
    pa, pb = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys() and len(sa) == len(pa)  # named_parameters lists a tied weight once
    for i in sa:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[i][key], sb[i][key]), (i, key)


STATE = {"step": 7, "data": {"epoch": 1, "offset": 12}, "rng": "abc", "skipped_steps": [3]}


def test_config_rejects_bad_values_naming_the_field(tmp_path):
    for kw, field in ((dict(interval=-1), "interval"), (dict(keep_last=-2), "keep_last"),
                      (dict(load_step=-3), "load_step"), (dict(init_from=str(tmp_path / "nope")), "init_from"),
                      (dict(load_step=4, resume=False), "load_step")):
        with pytest.raises(ConfigError, match=f"checkpoint.{field}="):
            CheckpointConfig(**kw).validate()


def test_resume_restores_weights_optimizer_and_train_state_exactly(tmp_path):
    model, opt = _trained(seed=0, steps=2)
    cp = _checkpointer(tmp_path)
    path = cp.save(7, [model], [opt], STATE)
    assert path == tmp_path / "run" / "checkpoints" / "step-00000007"
    stored = ckpt.tensor_metadata(path)
    assert "model.tok_embeddings.weight" in stored and "model.output.weight" not in stored
    assert stored["optimizer.state.layers.1.feed_forward.w2.weight.exp_avg_sq"][0] == (64, 176)
    meta = ckpt.read_meta(path)
    assert meta["train_state"] == STATE and meta["step"] == 7 and meta["model"]["vocab_size"] == 500

    fresh = build_model(CFG, seed=5)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
    assert not fresh_opt.state
    state = _checkpointer(tmp_path).load(cp.latest(), [fresh], [fresh_opt])
    assert state == STATE
    _assert_same(model, opt, fresh, fresh_opt)
    assert fresh.output.weight is fresh.tok_embeddings.weight
    # The resumed run continues exactly as the original one.
    tokens = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(9))
    for m, o in ((model, opt), (fresh, fresh_opt)):
        m(tokens).float().logsumexp(-1).mean().backward()
        o.step()
    _assert_same(model, opt, fresh, fresh_opt)


def test_saving_a_fresh_optimizer_leaves_it_fresh(tmp_path):
    model, untouched = build_model(CFG, seed=0), build_model(CFG, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    path = _checkpointer(tmp_path).save(0, [model], [opt], {"step": 0})
    stored = ckpt.tensor_metadata(path)
    assert "optimizer.state.layers.0.attention.wq.weight.step" in stored
    resumed = build_model(CFG, seed=3)
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    _checkpointer(tmp_path).load(path, [resumed], [resumed_opt])
    tokens = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(9))
    runs = [(model, opt), (untouched, torch.optim.AdamW(untouched.parameters(), lr=1e-2)), (resumed, resumed_opt)]
    for m, o in runs:  # Adam's first step moves every weight by about lr: a step count of 2 would not
        m(tokens).float().logsumexp(-1).mean().backward()
        o.step()
    for m, o in runs[1:]:
        for a, b in zip(model.parameters(), m.parameters(), strict=True):
            assert torch.equal(a, b)
        assert all(st["step"].item() == 1 for st in o.state.values())


def test_virtual_stages_on_one_rank_save_and_load_as_one_model(tmp_path):
    cfg = dataclasses.replace(CFG, tie_embeddings=False)
    whole = build_model(cfg, seed=2)
    first, second = copy.deepcopy(whole), copy.deepcopy(whole)
    del first.layers["1"]
    first.norm = first.output = None
    del second.layers["0"]
    second.tok_embeddings = None
    opts = [torch.optim.AdamW(part.parameters(), lr=1e-2) for part in (first, second)]
    for part, opt in zip((first, second), opts, strict=True):
        for name, p in part.named_parameters():
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name)))
        opt.step()
    cp = TrainCheckpointer(CheckpointConfig(), tmp_path, model_cfg=cfg)
    path = cp.save(1, [first, second], opts, {"step": 1})
    loaded = build_model(cfg, seed=3)
    loaded_opt = torch.optim.AdamW(loaded.parameters(), lr=1e-2)
    cp.load(path, [loaded], [loaded_opt])
    state = {n: loaded_opt.state[p] for n, p in loaded.named_parameters()}
    for part, opt in zip((first, second), opts, strict=True):
        for name, p in part.named_parameters():
            assert torch.equal(dict(loaded.named_parameters())[name], p), name
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(state[name][key], opt.state[p][key]), (name, key)


def test_wrapped_blocks_save_and_load_under_plain_names(tmp_path):
    model, opt = _trained(seed=1)
    _checkpointer(tmp_path).save(1, [model], [opt], {"step": 1})
    wrapped = build_model(CFG, seed=2)
    for name in list(wrapped.layers):  # what parallelize applies: activation checkpointing, then compile
        wrapped.layers[name] = torch.compile(checkpoint_wrapper(wrapped.layers[name]))
    wrapped_opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-2, weight_decay=0.1)
    _checkpointer(tmp_path).load(tmp_path / "run/checkpoints/step-00000001", [wrapped], [wrapped_opt])
    plain = {n.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", ""): p
             for n, p in wrapped.named_parameters()}
    for name, p in model.named_parameters():
        assert torch.equal(plain[name], p), name


def test_a_training_checkpoint_exports_to_hugging_face(tmp_path):
    model, opt = _trained(seed=3)
    path = _checkpointer(tmp_path).save(1, [model], [opt], {"step": 1})
    out = convert_cptron_to_hf(path, tmp_path / "hf", progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert hf.config.vocab_size == 500 and hf.config.tie_word_embeddings
    tokens = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(tokens)[..., :500] - hf(tokens).logits).abs().max() < 1e-5


def test_keep_last_prunes_oldest_and_stale_staging_dirs(tmp_path):
    model, opt = _trained()
    folder = tmp_path / "run" / "checkpoints"
    cp = _checkpointer(tmp_path, keep_last=2)
    cp.save(1, [model], [opt], {"step": 1})
    (folder / ".step-00000002.incomplete").mkdir()  # a killed write
    for step in (3, 4, 5):
        cp.save(step, [model], [opt], {"step": step})
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".deleting")) == \
        ["step-00000004", "step-00000005"]
    deadline = time.monotonic() + 10
    while list(folder.glob(".*")) and time.monotonic() < deadline:  # removed by a background thread
        time.sleep(0.05)
    assert not list(folder.glob(".*"))

    keep_all = _checkpointer(tmp_path, keep_last=0)
    for step in (6, 7):
        keep_all.save(step, [model], [opt], {"step": step})
    assert len([p for p in folder.iterdir() if ckpt.is_complete(p)]) == 4


def test_keep_last_never_removes_the_checkpoint_just_written(tmp_path):
    model, opt = _trained()
    cp = _checkpointer(tmp_path, keep_last=1)
    cp.save(9, [model], [opt], {"step": 9})
    cp.save(4, [model], [opt], {"step": 4})  # e.g. a run branched from an older step
    folder = tmp_path / "run" / "checkpoints"
    assert ckpt.is_complete(folder / "step-00000004") and ckpt.is_complete(folder / "step-00000009")


def test_incomplete_checkpoints_are_ignored_by_latest(tmp_path):
    model, opt = _trained()
    cp = _checkpointer(tmp_path)
    cp.save(2, [model], [opt], {"step": 2})
    folder = tmp_path / "run" / "checkpoints"
    staging = folder / ".step-00000003.incomplete"
    staging.mkdir()
    (staging / ".metadata").write_bytes(b"partial")
    assert cp.latest() == folder / "step-00000002"
    with pytest.raises(CheckpointError, match="incomplete"):
        cp.load(folder / "step-00000003", [model], [opt])


def test_async_save_snapshots_the_state_and_wait_completes_it(tmp_path):
    model, opt = _trained(seed=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cp = _checkpointer(tmp_path, async_save=True)
    path = cp.save(1, [model], [opt], {"step": 1})
    with torch.no_grad():  # the next training step overwrites the weights while the write runs
        for p in model.parameters():
            p.add_(1.0)
    cp.wait()
    assert ckpt.is_complete(path) and cp.latest() == path
    fresh = build_model(CFG, seed=8)
    cp.load(path, [fresh], [torch.optim.AdamW(fresh.parameters())])
    for name, p in fresh.named_parameters():
        assert torch.equal(p, before[name]), name


def _failing_write(self, plan, planner):
    raise OSError("disk full")


@pytest.mark.parametrize("async_save", [False, True])
def test_a_failed_write_keeps_the_previous_checkpoint_latest(tmp_path, monkeypatch, async_save):
    model, opt = _trained()
    cp = _checkpointer(tmp_path, async_save=async_save)
    first = cp.save(1, [model], [opt], {"step": 1})
    cp.wait()
    monkeypatch.setattr(FileSystemWriter, "write_data", _failing_write)
    with pytest.raises(CheckpointError, match="step-00000002 failed: .*disk full"):
        cp.save(2, [model], [opt], {"step": 2})
        cp.wait()
    assert cp.latest() == first
    assert (first.parent / ".step-00000002.incomplete").is_dir()
    monkeypatch.undo()
    cp.save(2, [model], [opt], {"step": 2})
    cp.wait()
    assert cp.latest() == first.parent / "step-00000002"


def _save_then_hang(folder, ready, model, opt):
    from torch.distributed.checkpoint.filesystem import _FileSystemWriter

    torch.set_num_threads(1)  # the parent's OpenMP pool does not exist in a forked child

    original = _FileSystemWriter.write_data

    def write_then_hang(self, plan, planner):
        result = original(self, plan, planner)
        result.wait()  # this rank's data is on disk; .metadata and COMPLETE are not
        ready.set()
        time.sleep(60)
        return result

    FileSystemWriter.write_data = write_then_hang
    TrainCheckpointer(CheckpointConfig(), folder, model_cfg=CFG).save(2, [model], [opt], {"step": 2})
    os._exit(0)


def test_a_save_killed_mid_write_leaves_the_previous_checkpoint_latest(tmp_path):
    model, opt = _trained()
    cp = _checkpointer(tmp_path)
    first = cp.save(1, [model], [opt], {"step": 1})
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_save_then_hang, args=(tmp_path / "run", ready, model, opt))
    child.start()
    try:
        assert ready.wait(30), "the child never reached the write"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.join(10)
    assert child.exitcode == -signal.SIGKILL
    staging = first.parent / ".step-00000002.incomplete"
    assert any(staging.glob("*.distcp")) and not (staging / ckpt.COMPLETE_MARKER).exists()
    assert cp.latest() == first
    cp.save(2, [model], [opt], {"step": 2})
    assert cp.latest() == first.parent / "step-00000002"


def test_weights_only_checkpoints_need_load_optimizer_false(tmp_path):
    model, opt = _trained(seed=6)
    path = _checkpointer(tmp_path, save_optimizer=False).save(3, [model], [opt], {"step": 3})
    assert not [k for k in ckpt.tensor_metadata(path) if k.startswith("optimizer.")]
    fresh = build_model(CFG, seed=1)
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    with pytest.raises(CheckpointError, match="no optimizer state .*load_optimizer=false"):
        _checkpointer(tmp_path).load(path, [fresh], [fresh_opt])
    assert _checkpointer(tmp_path, load_optimizer=False).load(path, [fresh], [fresh_opt]) == {"step": 3}
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True))


def test_train_state_must_be_json(tmp_path):
    model, opt = _trained()
    with pytest.raises(CheckpointError, match="train_state is not JSON-serializable"):
        _checkpointer(tmp_path).save(1, [model], [opt], {"rng": torch.get_rng_state()})
    assert _checkpointer(tmp_path).latest() is None


def test_resume_path_follows_load_step_and_refuses_to_clobber(tmp_path):
    model, opt = _trained()
    cp = _checkpointer(tmp_path)
    assert cp.resume_path() is None
    for step in (2, 4):
        cp.save(step, [model], [opt], {"step": step})
    assert cp.resume_path().name == "step-00000004"
    assert _checkpointer(tmp_path, load_step=2).resume_path().name == "step-00000002"
    with pytest.raises(CheckpointError, match="load_step=3: checkpoint .*step-00000003 does not exist"):
        _checkpointer(tmp_path, load_step=3).resume_path()
    with pytest.raises(CheckpointError, match="resume=false, but .* holds checkpoints"):
        _checkpointer(tmp_path, resume=False).resume_path()


def test_loading_a_conversion_checkpoint_as_resume_points_to_init_from(tmp_path):
    model = build_model(CFG, seed=0)
    ckpt.write_checkpoint(tmp_path / "conv", {"model": dict(model.named_parameters())},
                          {"model": json.loads(json.dumps(CFG.__dict__)), "step": 0})
    with pytest.raises(CheckpointError, match="no train_state.*init_from"):
        _checkpointer(tmp_path).load(tmp_path / "conv", [model], [torch.optim.AdamW(model.parameters())])


# ------------------------------------------------------------------ initial weights

def _scramble(model):
    """Non-zero everywhere, so a row or tensor the load forgets to write shows up."""
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)


def make_hf(path, tie=False, vocab=HF_VOCAB, **save_kwargs):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=50000.0, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2)).eval()
    hf.save_pretrained(path, **save_kwargs)
    return hf


@pytest.mark.parametrize("tie, shards", [(False, 1), (True, 1), (False, 4)])
def test_initial_weights_from_hf_match_transformers_logits(tmp_path, tie, shards):
    hf = make_hf(tmp_path / "hf", tie=tie, max_shard_size="5GB" if shards == 1 else "60KB")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) >= shards
    cfg = model_config_for_init(str(tmp_path / "hf"), pad_vocab_to_multiple_of=64)
    assert cfg.padded_vocab_size == 320 and cfg.rope_theta == 50000.0 and cfg.tie_embeddings == tie
    model = build_model(cfg, seed=1)
    _scramble(model)
    cp = TrainCheckpointer(CheckpointConfig(init_from=str(tmp_path / "hf")), tmp_path / "run", model_cfg=cfg)
    load_initial_weights(tmp_path / "hf", [model], cfg)
    assert torch.count_nonzero(model.tok_embeddings.weight[HF_VOCAB:]) == 0
    tokens = torch.randint(0, HF_VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(tokens)[..., :HF_VOCAB] - hf(tokens).logits).abs().max() < 1e-5
    # The run's checkpoints carry the HF config, so the export keeps its token ids.
    path = cp.save(0, [model], [torch.optim.AdamW(model.parameters())], {"step": 0})
    assert ckpt.read_meta(path)["hf_config"]["bos_token_id"] == 1


def test_initial_weights_refuse_mismatched_vocab_missing_and_misshaped_tensors(tmp_path):
    make_hf(tmp_path / "hf")
    cfg = model_config_for_init(str(tmp_path / "hf"), pad_vocab_to_multiple_of=1)
    model = build_model(cfg, seed=1)
    other = build_model(model_config_from_preset("tiny", vocab_size=HF_VOCAB + 1), seed=0)
    with pytest.raises(CheckpointError, match="vocabulary mismatch: .*config.json has vocab_size=300"):
        load_initial_weights(tmp_path / "hf", [other], other.cfg)

    weights = load_file(tmp_path / "hf" / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="'model.layers.1.mlp.up_proj.weight' .*is missing"):
        load_initial_weights(tmp_path / "hf", [model], cfg)
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(96, 32)
    save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"up_proj.weight' in .*model.safetensors has shape \[96, 32\]"):
        load_initial_weights(tmp_path / "hf", [model], cfg)


def test_initial_weights_from_a_cptron_checkpoint_with_other_vocab_padding(tmp_path):
    hf = make_hf(tmp_path / "hf", tie=True)
    convert_hf_to_cptron(tmp_path / "hf", tmp_path / "cp", pad_vocab_to_multiple_of=1, progress=False)
    cfg = model_config_for_init(str(tmp_path / "cp"), pad_vocab_to_multiple_of=128)
    assert cfg.padded_vocab_size == 384
    model = build_model(cfg, seed=1)
    _scramble(model)
    load_initial_weights(tmp_path / "cp", [model], cfg)
    assert torch.count_nonzero(model.output.weight[HF_VOCAB:]) == 0
    tokens = torch.randint(0, HF_VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(tokens)[..., :HF_VOCAB] - hf(tokens).logits).abs().max() < 1e-5
