"""LR schedules: exact boundary values, shapes, monotonicity, the registry and validation messages."""
import dataclasses
import math
import random

import pytest
import torch

from cptron.config import config_from_dict, field_docs
from cptron.errors import ConfigError
from cptron.train.lr import SCHEDULES, LRConfig, Phase, PhasedSchedule, apply_lr, build_lr_schedule, chain


def factors(cfg: LRConfig, total: int, extra: int = 3) -> list[float]:
    schedule = build_lr_schedule(cfg, total)
    return [schedule.factor(s) for s in range(total + extra)]


# ---------------------------------------------------------------- exact values

def test_cosine_boundaries_and_midpoint():
    s = build_lr_schedule(LRConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1), 110)
    assert s.factor(0) == pytest.approx(0.1)  # (0 + 1) / 10: the first update is not wasted at LR 0
    assert s.factor(4) == pytest.approx(0.5)
    assert s.factor(9) == 1.0  # last warmup step: exactly the peak
    # decay step k = step - 10 sits at progress (k + 1) / 100
    assert s.factor(10) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 1 / 100)))
    assert s.factor(59) == pytest.approx(0.55)  # halfway down the cosine
    assert s.factor(109) == 0.1  # last step: exactly the floor
    assert s.factor(110) == 0.1 and s.factor(10**7) == 0.1


def test_linear_decay_values():
    s = build_lr_schedule(LRConfig(schedule="linear", warmup_steps=4, min_lr_ratio=0.0), 24)
    assert [s.factor(i) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert [s.factor(4 + k) for k in range(20)] == pytest.approx([1 - (k + 1) / 20 for k in range(20)])
    assert s.factor(23) == 0.0


def test_warmup_start_ratio():
    s = build_lr_schedule(LRConfig(schedule="constant", warmup_steps=5, warmup_start_ratio=0.5), 10)
    assert [s.factor(i) for i in range(6)] == pytest.approx([0.6, 0.7, 0.8, 0.9, 1.0, 1.0])


def test_no_warmup_starts_at_the_peak_side():
    assert factors(LRConfig(schedule="constant"), 5) == [1.0] * 8
    cos = build_lr_schedule(LRConfig(schedule="cosine", min_lr_ratio=0.0), 4)
    assert [cos.factor(i) for i in range(4)] == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * (k + 1) / 4)) for k in range(4)])
    # warmup_start_ratio must not leak into a schedule without warmup
    lin = build_lr_schedule(LRConfig(schedule="linear", warmup_start_ratio=0.3, min_lr_ratio=0.0), 10)
    assert lin.factor(0) == pytest.approx(0.9)


def test_explicit_decay_steps_hold_the_floor_afterwards():
    s = build_lr_schedule(LRConfig(schedule="cosine", warmup_steps=2, decay_steps=4, min_lr_ratio=0.2), 20)
    assert s.factor(1) == 1.0
    assert s.factor(5) == 0.2
    assert [s.factor(i) for i in range(6, 20)] == [0.2] * 14


def test_wsd_stable_then_decay_over_the_last_fraction():
    cfg = LRConfig(schedule="wsd", warmup_steps=5, decay_fraction=0.2, min_lr_ratio=0.1)
    f = factors(cfg, 100)
    assert f[4] == 1.0
    assert f[5:80] == [1.0] * 75  # stable until the last 20 steps
    assert f[80] == pytest.approx(1 - 0.9 / 20)  # linear decay by default
    assert f[99] == 0.1 and f[100:] == [0.1] * 3


@pytest.mark.parametrize("shape,moved_at_half", [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", math.sqrt(0.5))])
def test_wsd_decay_shapes(shape, moved_at_half):
    cfg = LRConfig(schedule="wsd", decay_steps=10, decay_shape=shape, min_lr_ratio=0.0)
    s = build_lr_schedule(cfg, 30)
    assert s.factor(19) == 1.0
    assert s.factor(24) == pytest.approx(1 - moved_at_half)  # decay step k=4: progress 5/10
    assert s.factor(29) == 0.0


def test_wsd_decay_fraction_rounds_and_decay_steps_wins():
    f = factors(LRConfig(schedule="wsd", decay_fraction=0.25, min_lr_ratio=0.0), 10)
    assert f[:8] == [1.0] * 8 and f[8] == pytest.approx(0.5)  # round(2.5) = 2 decay steps
    g = factors(LRConfig(schedule="wsd", decay_steps=4, decay_fraction=0.25, min_lr_ratio=0.0), 10)
    assert g[:6] == [1.0] * 6 and g[6] == pytest.approx(0.75)


# ---------------------------------------------------------------- properties

@pytest.mark.parametrize("cfg", [
    LRConfig(schedule="cosine", warmup_steps=7, warmup_start_ratio=0.2, min_lr_ratio=0.05),
    LRConfig(schedule="linear", warmup_steps=1, min_lr_ratio=0.3),
    LRConfig(schedule="constant", warmup_steps=13),
    LRConfig(schedule="wsd", warmup_steps=3, decay_fraction=0.3, decay_shape="1-sqrt", min_lr_ratio=0.0),
    LRConfig(schedule="wsd", warmup_steps=0, decay_steps=17, decay_shape="cosine", min_lr_ratio=0.5),
], ids=lambda c: f"{c.schedule}-{c.decay_shape}-w{c.warmup_steps}")
def test_monotone_and_bounded(cfg):
    total = 97
    f = factors(cfg, total, extra=20)
    w = cfg.warmup_steps
    assert all(a < b for a, b in zip(f[:w], f[1:w])), "warmup must rise strictly"
    assert all(a >= b for a, b in zip(f[w:], f[w + 1:])), "after warmup the LR must never rise"
    floor = 1.0 if cfg.schedule == "constant" else cfg.min_lr_ratio
    assert min(f[w:]) == floor and f[-1] == floor
    assert all(floor <= x <= 1.0 for x in f[w:])
    assert all(cfg.warmup_start_ratio < x <= 1.0 for x in f[:w])


def test_factor_is_a_pure_function_of_the_step():
    cfg = LRConfig(schedule="wsd", warmup_steps=10, decay_fraction=0.3)
    in_order = factors(cfg, 200)
    s = build_lr_schedule(cfg, 200)
    steps = list(range(203))
    random.Random(0).shuffle(steps)
    assert {i: s.factor(i) for i in steps} == dict(enumerate(in_order))


def test_negative_step_is_refused():
    with pytest.raises(ValueError, match="step=-1"):
        build_lr_schedule(LRConfig(), 10).factor(-1)


# ---------------------------------------------------------------- phases and the registry

def test_chain_builds_an_infinite_style_schedule():
    # warmup -> inverse-sqrt cooldown to 0.5 -> constant -> linear annealing to 0 (Ibrahim et al., 2024)
    s = chain(0.0, [(4, 1.0, "linear"), (10, 0.5, "inverse_sqrt", 2.0), (6, 0.5, "constant"), (5, 0.0, "linear")])
    assert [p.start for p in s.phases] == [0, 4, 14, 20]
    assert s.factor(3) == 1.0 and s.factor(13) == 0.5 and s.factor(19) == 0.5 and s.factor(24) == 0.0
    # the inverse-sqrt cooldown at its first step: 1/sqrt(1 + x/2) rescaled to end at 0.5 after 10 steps
    tail = 1 / math.sqrt(6)
    moved = (1 - 1 / math.sqrt(1 + 1 / 2)) / (1 - tail)
    assert s.factor(4) == pytest.approx(1.0 - 0.5 * moved)
    cooldown = [s.factor(i) for i in range(4, 14)]
    assert all(a > b for a, b in zip(cooldown, cooldown[1:]))
    drops = [a - b for a, b in zip(cooldown, cooldown[1:])]
    assert all(a > b for a, b in zip(drops, drops[1:])), "inverse sqrt falls fastest at the start"


def test_a_new_registry_entry_needs_no_other_change(monkeypatch):
    def rewarm_then_constant(cfg, total_steps):
        rest = total_steps - cfg.warmup_steps
        return chain(cfg.min_lr_ratio, [(cfg.warmup_steps, 1.0, "cosine"), (rest, 1.0, "constant")])

    monkeypatch.setitem(SCHEDULES, "rewarm", rewarm_then_constant)
    cfg = config_from_dict(LRConfig, {"schedule": "rewarm", "warmup_steps": 2, "min_lr_ratio": 0.5})
    assert factors(cfg, 6) == pytest.approx([0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_builtin_registry():
    assert set(SCHEDULES) == {"cosine", "linear", "constant", "wsd", "infinite"}


def test_phase_validation():
    with pytest.raises(ConfigError, match=r"shape='exp' is invalid: expected one of \["):
        Phase(0, 3, 1.0, 0.0, "exp")
    with pytest.raises(ConfigError, match="end_factor=0.5 is invalid: expected start_factor=1.0 for a constant"):
        Phase(0, 3, 1.0, 0.5, "constant")
    with pytest.raises(ConfigError, match="timescale=None is invalid"):
        Phase(0, 3, 1.0, 0.5, "inverse_sqrt")
    with pytest.raises(ConfigError, match="length=0 is invalid"):
        Phase(0, 0, 1.0, 0.5)
    with pytest.raises(ConfigError, match="lr phase start=5 is invalid: expected 3"):
        PhasedSchedule((Phase(0, 3, 0.0, 1.0), Phase(5, 2, 1.0, 0.0)), 0.0)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("fields,total,message", [
    (dict(schedule="step"), 10,
     "lr.schedule='step' is invalid: expected one of ['constant', 'cosine', 'infinite', 'linear', 'wsd']"),
    (dict(warmup_steps=-1), 10, "lr.warmup_steps=-1 is invalid: expected an integer >= 0"),
    (dict(decay_steps=0), 10, "lr.decay_steps=0 is invalid: expected None or an integer >= 1"),
    (dict(schedule="constant", decay_steps=5), 10,
     "lr.decay_steps=5 is invalid: expected None for lr.schedule='constant'"),
    (dict(min_lr_ratio=1.5), 10, "lr.min_lr_ratio=1.5 is invalid: expected a float in [0, 1]"),
    (dict(warmup_start_ratio=-0.1), 10, "lr.warmup_start_ratio=-0.1 is invalid: expected a float in [0, 1]"),
    (dict(decay_fraction=0.0), 10, "lr.decay_fraction=0.0 is invalid: expected a float in (0, 1]"),
    (dict(decay_shape="exp"), 10, "lr.decay_shape='exp' is invalid"),
    (dict(warmup_steps=11), 10, "lr.warmup_steps=11 is invalid: expected at most the total_steps=10"),
    (dict(warmup_steps=4, decay_steps=7), 10,
     "lr.warmup_steps + lr.decay_steps='4 + 7' is invalid: expected at most the total_steps=10"),
    (dict(schedule="wsd", warmup_steps=6, decay_steps=5), 10,
     "lr.warmup_steps + lr.decay_steps='6 + 5' is invalid: expected at most the total_steps=10"),
    (dict(schedule="wsd", warmup_steps=9, decay_fraction=0.2), 10,
     "lr.warmup_steps + round(lr.decay_fraction * total_steps)='9 + 2' is invalid"),
    (dict(), 0, "total_steps=0 is invalid: expected an integer >= 1"),
])
def test_validation_messages(fields, total, message):
    with pytest.raises(ConfigError) as err:
        build_lr_schedule(LRConfig(**fields), total)
    assert message in str(err.value)


def test_warmup_may_fill_the_whole_run():
    f = factors(LRConfig(schedule="cosine", warmup_steps=4, min_lr_ratio=0.2), 4)
    assert f == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.2, 0.2, 0.2])  # after the run: the floor


def test_every_field_has_a_docstring_and_yaml_parses():
    assert set(field_docs(LRConfig)) == {f.name for f in dataclasses.fields(LRConfig)}
    cfg = config_from_dict(LRConfig, {"schedule": "wsd", "decay_shape": "1-sqrt", "decay_steps": None})
    assert cfg.decay_shape == "1-sqrt"
    with pytest.raises(ConfigError, match="lr.schedule"):
        config_from_dict(LRConfig, {"schedule": "nope"})


# ---------------------------------------------------------------- apply_lr

def test_apply_lr_sets_every_group_of_every_optimizer():
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    adam = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr_scale": 10.0}], lr=1.0)
    sgd = torch.optim.SGD([c], lr=1.0)
    assert apply_lr([adam, sgd], 3e-4, 0.5) == pytest.approx(1.5e-4)
    assert adam.param_groups[0]["lr"] == pytest.approx(1.5e-4)
    assert adam.param_groups[1]["lr"] == pytest.approx(1.5e-3)
    assert sgd.param_groups[0]["lr"] == pytest.approx(1.5e-4)


def test_apply_lr_fills_a_tensor_lr_in_place():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([p], lr=torch.tensor(1.0))
    lr_tensor = opt.param_groups[0]["lr"]
    apply_lr([opt], 2e-3, 0.25)
    assert opt.param_groups[0]["lr"] is lr_tensor
    assert lr_tensor.item() == pytest.approx(5e-4)
