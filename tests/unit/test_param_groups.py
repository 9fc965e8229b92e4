"""Parameter groups, frozen parameters and new-rows-only training: resolving the config against the
model's names, the AdamW groups and LRs they give, the row mask and decay, and every refusal."""

import json

import pytest
import torch

from cptron.config import parse_config
from cptron.errors import ConfigError, CptronError
from cptron.models.config import model_config_from_preset
from cptron.models.llama import build_model
from cptron.train.config import JobConfig
from cptron.train.lr import apply_lr
from cptron.train.optim import OptimizerConfig, ParamGroupConfig, build_optimizers
from cptron.train.param_groups import VOCAB_EXTENSION_FILE, resolve_trainable

CPU = torch.device("cpu")


def model_cfg(tied=False):
    return model_config_from_preset(
        "tiny", n_layers=2, vocab_size=100, pad_vocab_to_multiple_of=64, max_seq_len=32, tie_embeddings=tied
    )


def optim(**kw):
    cfg = OptimizerConfig(lr=1e-2, weight_decay=0.1, implementation="for_loop", **kw)
    cfg.validate()
    return cfg


def test_patterns_first_group_wins_frozen_wins_and_default_decay():
    cfg = optim(
        frozen=["layers.0.*"],
        param_groups=[
            ParamGroupConfig(["layers.*.attention.wq.weight", "output.weight"], lr_scale=10.0),
            ParamGroupConfig(["layers.*"], lr_scale=0.5, weight_decay=0.0),
        ],
    )
    plan = resolve_trainable(cfg, model_cfg())
    assert all(n.startswith("layers.0.") for n in plan.frozen) and len(plan.frozen) == 9
    wq, w1, norm = (
        plan.rules["layers.1.attention.wq.weight"],
        plan.rules["layers.1.feed_forward.w1.weight"],
        plan.rules["layers.1.attention_norm.weight"],
    )
    assert (wq.group, wq.lr_scale, wq.weight_decay) == (0, 10.0, 0.1), "first group wins; its decay: the default"
    assert (w1.group, w1.lr_scale, w1.weight_decay) == (1, 0.5, 0.0)
    assert (norm.group, norm.weight_decay) == (1, 0.0)
    emb, final_norm = plan.rules["tok_embeddings.weight"], plan.rules["norm.weight"]
    assert (emb.group, emb.lr_scale, emb.weight_decay) == (None, 1.0, 0.1), "unmatched: decayed matrix"
    assert (final_norm.group, final_norm.weight_decay) == (None, 0.0), "unmatched: undecayed vector"
    assert plan.rules["output.weight"].lr_scale == 10.0


def test_optimizer_groups_lr_scale_and_weight_decay():
    cfg = optim(
        frozen=["layers.0.*"],
        param_groups=[ParamGroupConfig(["tok_embeddings.weight"], lr_scale=10.0, weight_decay=0.0)],
    )
    mc = model_cfg()
    plan = resolve_trainable(cfg, mc)
    model = build_model(mc, seed=0)
    plan.freeze(model)
    [opt] = build_optimizers([model], cfg, CPU, plan)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert p.requires_grad == (not name.startswith("layers.0.")), name
        assert (id(p) in in_opt) == p.requires_grad, "frozen parameters are in no group"
    assert apply_lr([opt], 1e-2, 0.5) == 5e-3
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    emb = by_param[id(model.tok_embeddings.weight)]
    assert emb["lr"] == pytest.approx(5e-2) and emb["weight_decay"] == 0.0
    assert by_param[id(model.output.weight)]["lr"] == pytest.approx(5e-3)
    assert by_param[id(model.output.weight)]["weight_decay"] == 0.1
    assert by_param[id(model.norm.weight)]["weight_decay"] == 0.0


def test_mask_keeps_old_and_padding_rows_and_new_rows_follow_adamw():
    """New rows move exactly as a plain AdamW with weight decay moves them (decay applied to their
    slice by the plan); old rows (< 60) and padding rows (>= 100 of 128) stay bit-exact."""
    mc = model_cfg()
    cfg = optim(train_new_rows_only=True, new_rows_from=60)
    plan = resolve_trainable(cfg, mc)
    model = build_model(mc, seed=0)
    plan.freeze(model)
    [opt] = build_optimizers([model], cfg, CPU, plan)
    emb = model.tok_embeddings.weight
    ref = emb.detach().clone().requires_grad_(True)
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    start = emb.detach().clone()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        grad = torch.randn(emb.shape, generator=g)
        emb.grad, ref.grad = grad.clone(), grad.clone()
        model.output.weight.grad = torch.randn(emb.shape, generator=g)
        plan.mask_grads([model])
        assert emb.grad[:60].abs().sum() == 0 and emb.grad[100:].abs().sum() == 0
        plan.decay_new_rows([opt])
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
    assert torch.equal(emb[:60], start[:60]) and torch.equal(emb[100:], start[100:])
    assert torch.equal(model.output.weight[:60], build_model(mc, seed=0).output.weight[:60])
    torch.testing.assert_close(emb[60:100], ref[60:100], rtol=0, atol=1e-7)
    assert not torch.equal(emb[60:100], start[60:100])
    state = opt.state[emb]
    assert state["exp_avg"][:60].abs().sum() == 0 and state["exp_avg_sq"][100:].abs().sum() == 0
    state["exp_avg"].fill_(1.0)  # as a checkpoint of a run that trained every row would hold
    plan.zero_masked_moments([opt])
    assert state["exp_avg"][:60].abs().sum() == 0 and state["exp_avg"][60:100].eq(1).all()


def test_new_rows_only_freezes_everything_else_and_counts():
    plan = resolve_trainable(optim(train_new_rows_only=True, new_rows_from=60), model_cfg())
    assert set(plan.rules) == {"tok_embeddings.weight", "output.weight"}
    trained, total = plan.counts()
    assert trained == 2 * 40 * 64
    line = plan.describe()
    assert "trainable: 5,120 of" in line and "ids 60..99" in line
    tied = resolve_trainable(optim(train_new_rows_only=True, new_rows_from=60), model_cfg(tied=True))
    assert set(tied.rules) == {"tok_embeddings.weight"} and tied.name_of("output.weight") == "tok_embeddings.weight"
    assert resolve_trainable(optim(), model_cfg()).describe() is None


def test_new_rows_from_vocab_extension_json(tmp_path):
    cfg = optim(train_new_rows_only=True)
    (tmp_path / VOCAB_EXTENSION_FILE).write_text(json.dumps({"old_vocab_size": 70, "new_tokens": 30}))
    assert resolve_trainable(cfg, model_cfg(), str(tmp_path)).rows == (70, 100)
    (tmp_path / VOCAB_EXTENSION_FILE).write_text("{not json")
    with pytest.raises(CptronError, match=f"{VOCAB_EXTENSION_FILE}: cannot read it as JSON"):
        resolve_trainable(cfg, model_cfg(), str(tmp_path))
    (tmp_path / VOCAB_EXTENSION_FILE).write_text(json.dumps({"old_vocab_size": "70"}))
    with pytest.raises(CptronError, match="old_vocab_size='70' is invalid"):
        resolve_trainable(cfg, model_cfg(), str(tmp_path))
    (tmp_path / VOCAB_EXTENSION_FILE).write_text(json.dumps({"old_vocab_size": 100}))
    with pytest.raises(ConfigError, match=r"old_vocab_size in .*=100 is invalid: expected a token id in \[1, 100\)"):
        resolve_trainable(cfg, model_cfg(), str(tmp_path))
    (tmp_path / VOCAB_EXTENSION_FILE).unlink()
    with pytest.raises(ConfigError, match="optim.new_rows_from=0 is invalid: .* does not exist"):
        resolve_trainable(cfg, model_cfg(), str(tmp_path))


@pytest.mark.parametrize(
    "kw,init_from,message",
    [
        (dict(frozen=["layers.9.*"]), None, r"optim.frozen\[0\]='layers.9.\*' is invalid: expected a pattern matching"),
        (
            dict(param_groups=[ParamGroupConfig(["attention.*"])]),
            None,
            r"optim.param_groups\[0\].patterns='attention.\*' is invalid",
        ),
        (dict(frozen=["layers.*"], param_groups=[ParamGroupConfig(["layers.1.*"])]), None, "all it matches is frozen"),
        (dict(frozen=["*"]), None, r"optim.frozen=\['\*'\] is invalid: .*every one is frozen"),
        (
            dict(train_new_rows_only=True, new_rows_from=60, frozen=["tok_embeddings.weight", "output.weight"]),
            None,
            r"optim.frozen=\[.*\] is invalid: .*every one is frozen",
        ),
        (dict(train_new_rows_only=True), None, "optim.new_rows_from=0 is invalid: expected the first new token id"),
        (dict(train_new_rows_only=True, new_rows_from=100), None, r"optim.new_rows_from=100 is invalid.*\[1, 100\)"),
    ],
)
def test_start_up_errors_name_the_field(kw, init_from, message):
    with pytest.raises(ConfigError, match=message):
        resolve_trainable(optim(**kw), model_cfg(), init_from)


def test_tied_head_pattern_error_says_it_is_tied():
    with pytest.raises(ConfigError, match="the head is tied"):
        resolve_trainable(optim(frozen=["output.weight"]), model_cfg(tied=True))


@pytest.mark.parametrize(
    "kw,message",
    [
        (
            dict(param_groups=[ParamGroupConfig(["norm.weight"], lr_scale=0.0)]),
            r"optim.param_groups\[0\].lr_scale=0.0 is invalid: expected a finite number > 0",
        ),
        (
            dict(param_groups=[ParamGroupConfig(["norm.weight"], weight_decay=-0.1)]),
            r"optim.param_groups\[0\].weight_decay=-0.1 is invalid",
        ),
        (dict(param_groups=[ParamGroupConfig([])]), r"optim.param_groups\[0\].patterns=\[\] is invalid"),
        (
            dict(frozen=["layers.0.*"], param_groups=[ParamGroupConfig(["layers.0.*"])]),
            r"optim.param_groups\[0\].patterns='layers.0.\*' is invalid: expected a pattern that is not also in optim.frozen",
        ),
        (dict(new_rows_from=5), "optim.new_rows_from=5 is invalid: expected 0 unless optim.train_new_rows_only"),
        (dict(new_rows_from=-1, train_new_rows_only=True), "optim.new_rows_from=-1 is invalid"),
    ],
)
def test_config_validation(kw, message):
    with pytest.raises(ConfigError, match=message):
        OptimizerConfig(**kw).validate()


def test_command_line_and_job_validation():
    job = parse_config(
        JobConfig,
        [
            "--optim.frozen",
            "layers.0.*,norm.weight",
            "--optim.param_groups.0.patterns",
            "tok_embeddings.weight",
            "--optim.param_groups.0.lr_scale",
            "10",
            "--optim.train_new_rows_only",
            "true",
            "--optim.new_rows_from",
            "32",
        ],
    )
    assert job.optim.frozen == ["layers.0.*", "norm.weight"]
    assert job.optim.param_groups == [ParamGroupConfig(["tok_embeddings.weight"], lr_scale=10.0)]
    job.optim.new_rows_from = 0
    with pytest.raises(ConfigError, match="optim.new_rows_from=0 is invalid: .*checkpoint.init_from"):
        job.validate()
    job.checkpoint.init_from = "/somewhere/extended"
    job.validate()
