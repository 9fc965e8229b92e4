"""The infinite schedule (Ibrahim et al., 2024) against its closed form, `first_difference`, and the
rule that a resumed run keeps its schedule: a change that rewrites a step already taken is refused
naming the field and both values; one that leaves them all as they were is allowed and logged."""
import json
import math
import time

import pytest

from cptron import checkpoint as ckpt
from cptron.config import config_to_dict
from cptron.errors import ConfigError
from cptron.train.branch import fresh_start_note, resumed_schedule, schedule_record
from cptron.train.config import JobConfig, TrainingConfig
from cptron.train.lr import LRConfig, Phase, build_lr_schedule, chain, first_difference
from cptron.train.optim import OptimizerConfig


def infinite(total=1000, **fields) -> list[float]:
    cfg = LRConfig(schedule="infinite", **fields)
    s = build_lr_schedule(cfg, total)
    return [s.factor(i) for i in range(total + 5)]


def g(x, tau):
    return 1 - 1 / math.sqrt(1 + x / tau)


# ---------------------------------------------------------------- closed forms

def test_cosine_cooldown_constant_and_exponential_annealing():
    w, c, r, m, s, length = 10, 40, 0.4, 0.05, 600, 200
    f = infinite(warmup_steps=w, cooldown_steps=c, constant_ratio=r, min_lr_ratio=m, anneal_start=s,
                 decay_steps=length, warmup_start_ratio=0.1)
    for i in (0, 3, 9):  # warmup: a + (1 - a) x / w with x = i + 1
        assert f[i] == pytest.approx(0.1 + 0.9 * (i + 1) / w, rel=1e-12)
    for x in (1, 7, 20, 33, 40):  # cooldown update w + x - 1
        assert f[w + x - 1] == pytest.approx(r + (1 - r) * (1 + math.cos(math.pi * x / c)) / 2, rel=1e-12)
    assert f[w + c - 1] == r and f[w + c:s] == [r] * (s - w - c)
    for x in (1, 50, 137, 200):  # annealing update s + x - 1
        assert f[s + x - 1] == pytest.approx(r * (m / r) ** (x / length), rel=1e-12)
    assert f[s + length - 1] == m and f[s + length:] == [m] * (1005 - s - length)


def test_inverse_sqrt_cooldown_and_annealing():
    w, c, r, m, s, tau = 5, 30, 0.5, 0.0, 100, 4.0
    f = infinite(total=150, warmup_steps=w, cooldown_steps=c, constant_ratio=r, min_lr_ratio=m, anneal_start=s,
                 cooldown_shape="inverse_sqrt", anneal_shape="inverse_sqrt", inverse_sqrt_timescale=tau)
    for x in (1, 2, 10, 30):
        assert f[w + x - 1] == pytest.approx(1 - (1 - r) * g(x, tau) / g(c, tau), rel=1e-12)
    length = 150 - s  # decay_steps None: anneal to the end of training
    for x in (1, 9, 25, 50):
        assert f[s + x - 1] == pytest.approx(r - (r - m) * g(x, tau) / g(length, tau), rel=1e-12, abs=1e-15)
    assert f[149] == 0.0


def test_default_timescale_is_a_tenth_of_the_phase():
    f = infinite(total=100, cooldown_steps=20, cooldown_shape="inverse_sqrt", constant_ratio=0.5)
    assert f[4] == pytest.approx(1 - 0.5 * g(5, 2.0) / g(20, 2.0), rel=1e-12)


def test_without_anneal_start_the_constant_phase_is_open():
    f = infinite(total=50, warmup_steps=2, cooldown_steps=3, constant_ratio=0.25)
    assert f[5:] == [0.25] * 50
    assert infinite(total=10, constant_ratio=0.3) == [0.3] * 15  # no warmup, no cooldown: constant from step 0


def test_annealing_may_start_right_after_the_cooldown():
    f = infinite(total=20, warmup_steps=2, cooldown_steps=3, constant_ratio=0.5, min_lr_ratio=0.1, anneal_start=5)
    assert f[4] == 0.5 and f[5] == pytest.approx(0.5 * 0.2 ** (1 / 15), rel=1e-12) and f[19] == 0.1


def test_exponential_phase_shape():
    s = chain(1.0, [(4, 0.0625, "exponential")])
    assert [s.factor(i) for i in range(4)] == pytest.approx([0.5, 0.25, 0.125, 0.0625], rel=1e-12)
    flat = chain(0.3, [(3, 0.3, "exponential")])
    assert [flat.factor(i) for i in range(3)] == pytest.approx([0.3] * 3)
    with pytest.raises(ConfigError, match="for the exponential shape"):
        Phase(0, 3, 1.0, 0.0, "exponential")


@pytest.mark.parametrize("fields,total,message", [
    (dict(anneal_start=5), 100, "lr.anneal_start=5 is invalid: expected a step in [30, 100): after warmup and "
                                "cooldown"),
    (dict(anneal_start=100), 100, "lr.anneal_start=100 is invalid: expected a step in [30, 100)"),
    (dict(anneal_start=50, decay_steps=60), 100, "lr.anneal_start + lr.decay_steps='50 + 60' is invalid"),
    (dict(anneal_start=50, min_lr_ratio=0.0), 100,
     "lr.min_lr_ratio=0.0 is invalid: expected a float > 0 for lr.anneal_shape='exponential'"),
    (dict(cooldown_steps=95), 100, "lr.warmup_steps + lr.cooldown_steps='10 + 95' is invalid"),
    (dict(constant_ratio=1.5), 100, "lr.constant_ratio=1.5 is invalid: expected a float in [0, 1]"),
    (dict(anneal_shape="linear"), 100, "lr.anneal_shape='linear' is invalid: expected one of"),
    (dict(inverse_sqrt_timescale=0.0), 100, "lr.inverse_sqrt_timescale=0.0 is invalid"),
    (dict(schedule="cosine", cooldown_steps=0, anneal_start=50), 100,
     "lr.anneal_start=50 is invalid: expected None unless lr.schedule='infinite'"),
    (dict(schedule="wsd", cooldown_steps=5), 100,
     "lr.cooldown_steps=5 is invalid: expected 0 unless lr.schedule='infinite'"),
])
def test_validation(fields, total, message):
    base = dict(schedule="infinite", warmup_steps=10, cooldown_steps=20)
    with pytest.raises(ConfigError) as err:
        build_lr_schedule(LRConfig(**{**base, **fields}), total)
    assert message in str(err.value)


# ---------------------------------------------------------------- first_difference

def sched(total, **fields):
    return build_lr_schedule(LRConfig(**fields), total)


def test_first_difference_finds_the_first_rewritten_step():
    inf = dict(schedule="infinite", warmup_steps=10, cooldown_steps=20)
    assert first_difference(sched(500, **inf), sched(500, **inf, anneal_start=300), 300) is None
    assert first_difference(sched(500, **inf), sched(500, **inf, anneal_start=250), 300) == 250
    assert first_difference(sched(500, **inf, anneal_start=250), sched(500, **inf, anneal_start=260), 300) == 250
    # cosine's decay depends on the run's length from its first step; wsd's stable phase does not
    assert first_difference(sched(100, schedule="cosine", warmup_steps=5), sched(200, schedule="cosine",
                                                                                 warmup_steps=5), 50) == 5
    wsd = dict(schedule="wsd", warmup_steps=5, decay_steps=10)
    assert first_difference(sched(100, **wsd), sched(200, **wsd), 90) is None
    assert first_difference(sched(100, **wsd), sched(200, **wsd), 91) == 90
    assert first_difference(sched(100, **wsd), sched(100, **wsd), 100) is None


def test_first_difference_does_not_walk_the_steps():
    inf = dict(schedule="infinite", warmup_steps=1000, cooldown_steps=10_000)
    a, b = sched(10**9, **inf), sched(2 * 10**9, **inf, anneal_start=10**9 - 5)
    start = time.perf_counter()
    assert first_difference(a, b, 10**9 - 5) is None
    assert first_difference(a, b, 10**9) == 10**9 - 5
    assert time.perf_counter() - start < 1.0  # a billion steps, compared by phases


# ---------------------------------------------------------------- a resume keeps its schedule

def job(steps=1000, peak=1e-3, **lr) -> JobConfig:
    return JobConfig(training=TrainingConfig(steps=steps), optim=OptimizerConfig(lr=peak), lr=LRConfig(**lr))


def fake_checkpoint(tmp_path, cfg: JobConfig, step: int, record=True):
    path = tmp_path / ckpt.step_dir_name(step)
    path.mkdir()
    state = {"step": step, **({"lr": schedule_record(cfg)} if record else {})}
    (path / ckpt.META_FILE).write_text(json.dumps({"format_version": ckpt.FORMAT_VERSION, "step": step,
                                                   "train_state": state}))
    (path / ckpt.COMPLETE_MARKER).write_text("complete\n")
    return path


INF = dict(schedule="infinite", warmup_steps=10, cooldown_steps=40, constant_ratio=0.5)


def test_the_same_schedule_resumes(tmp_path):
    path = fake_checkpoint(tmp_path, job(**INF), 300)
    note = resumed_schedule(job(**INF), path)
    assert note.startswith("LR from step 300: infinite schedule, peak 0.001 x (steps 1-10 linear 0 -> 1; "
                           "steps 11-50 cosine 1 -> 0.5; from step 51: 0.5); no annealing yet") and \
        note.endswith("the checkpoint's schedule"), note


def test_annealing_from_the_resumed_step_is_allowed_and_logged(tmp_path):
    path = fake_checkpoint(tmp_path, job(**INF), 300)
    note = resumed_schedule(job(steps=1200, **INF, anneal_start=300, min_lr_ratio=0.05), path)
    assert note.startswith(f"schedule changed since checkpoint {path} (lr.min_lr_ratio 0.1 -> 0.05; "
                           "lr.anneal_start None -> 300; training.steps 1000 -> 1200), steps 1-300 unchanged; "
                           "LR from step 300: infinite schedule"), note
    assert "steps 301-1200 exponential 0.5 -> 0.05" in note


@pytest.mark.parametrize("new,message", [
    (job(**{**INF, "anneal_start": 200}),
     "lr.anneal_start None -> 200 since checkpoint {path}: the LR of step 201, already taken, would change "
     "(0.0005 -> 0.000498995)"),
    (job(**{**INF, "constant_ratio": 0.6}), "lr.constant_ratio 0.5 -> 0.6 since checkpoint {path}: the LR of "
                                            "step 11, already taken"),
    (job(peak=2e-3, **INF), "optim.lr 0.001 -> 0.002 since checkpoint {path}: the LR of step 1, already taken, "
                            "would change (0.0001 -> 0.0002)"),
    (job(steps=2000, schedule="cosine", warmup_steps=10),
     "lr.schedule 'infinite' -> 'cosine'; lr.cooldown_steps 40 -> 0; lr.constant_ratio 0.5 -> 0.5"),
])
def test_a_change_to_steps_already_taken_is_refused(tmp_path, new, message):
    path = fake_checkpoint(tmp_path, job(**INF), 300)
    with pytest.raises(ConfigError) as err:
        resumed_schedule(new, path)
    text = str(err.value)
    assert "\n" not in text
    if "cosine" in message:  # every differing field is named, with both values
        assert text.startswith("lr.schedule 'infinite' -> 'cosine'; lr.cooldown_steps 40 -> 0; "
                               "training.steps 1000 -> 2000 since checkpoint"), text
    else:
        assert message.format(path=path) in text, text
    assert text.endswith("branch from it into a new run_dir with checkpoint.branch_from")


def test_a_checkpoint_without_a_record_says_so(tmp_path):
    path = fake_checkpoint(tmp_path, job(**INF), 300, record=False)
    assert f"(checkpoint {path} records no schedule to hold the run to)" in resumed_schedule(job(), path)


def test_an_unreadable_record_is_named(tmp_path):
    path = fake_checkpoint(tmp_path, job(**INF), 300)
    meta = json.loads((path / ckpt.META_FILE).read_text())
    meta["train_state"]["lr"]["config"]["schedule"] = "spiral"
    (path / ckpt.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"train_state.lr is unreadable \(lr.schedule='spiral' is invalid"):
        resumed_schedule(job(**INF), path)


def test_the_record_round_trips():
    cfg = job(**INF, anneal_start=700)
    assert schedule_record(cfg) == {"config": config_to_dict(cfg.lr), "total_steps": 1000, "peak": 1e-3}


def test_init_from_states_the_re_warm(tmp_path):
    cfg = job(schedule="cosine", warmup_steps=100)
    cfg.checkpoint.init_from = str(tmp_path)
    assert fresh_start_note(cfg).startswith("LR from step 0: cosine schedule, peak 0.001 x (steps 1-100 linear 0 "
                                            "-> 1; steps 101-1000 cosine 1 -> 0.1)")
    assert fresh_start_note(cfg).endswith(f"; re-warmed from the pretrained weights of {tmp_path} over 100 warmup "
                                          "steps")
    cfg.lr.warmup_steps = 0
    assert fresh_start_note(cfg).endswith("with no warmup (lr.warmup_steps=0)")
