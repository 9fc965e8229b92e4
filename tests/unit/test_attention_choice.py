"""training.attention=auto: which kernel each device and mask gets, the fallback, the log line, the cached compiled kernel."""

from __future__ import annotations

import logging

import pytest
import torch

import cptron.models.flex as flex
from cptron.errors import ConfigError
from cptron.models.config import model_config_from_preset
from cptron.models.flex import attention_is_masked, choose_attention, resolve_attention
from cptron.parallel.dims import ParallelConfig
from cptron.testing.distributed import run_distributed
from cptron.testing.training import PackedSource, make_train_config
from cptron.train.memory_plan import estimate_memory
from cptron.train.trainer import Trainer, attention_description

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a cuda device object needs no GPU


@pytest.mark.parametrize(
    "requested,device_type,masked,expected",
    [
        ("auto", "cuda", True, "flex"),  # packed documents on GPU: the block-sparse kernel
        ("auto", "cuda", False, "sdpa"),  # plain causal: SDPA's flash kernel
        ("auto", "cpu", True, "sdpa"),  # CPU unchanged: flex is only a dense reference there
        ("auto", "cpu", False, "sdpa"),
        ("auto", "mps", True, "sdpa"),
        ("sdpa", "cuda", True, "sdpa"),  # an explicit choice is kept
        ("flex", "cpu", True, "flex"),
        ("flex", "cuda", False, "flex"),
    ],
)
def test_resolve_attention(requested, device_type, masked, expected):
    assert resolve_attention(requested, device_type, masked) == expected


def test_masked_means_documents_or_a_window_shorter_than_the_sequence():
    assert attention_is_masked(True, None, 128)
    assert attention_is_masked(False, 64, 128)
    assert not attention_is_masked(False, 128, 128)  # the window covers the sequence: plain causal
    assert not attention_is_masked(False, None, 128)


def test_choose_attention_checks_only_the_chosen_kernel(monkeypatch):
    probed = []
    monkeypatch.setattr(flex, "_probe", lambda device: probed.append(device.type) or 0.0)
    assert choose_attention("auto", CPU, masked=True, compiled=True) == "sdpa"
    assert choose_attention("auto", CUDA, masked=False) == "sdpa"
    assert probed == []  # sdpa needs no probe
    assert choose_attention("auto", CUDA, masked=True, compiled=True) == "flex"
    assert probed == ["cuda"]


def test_auto_falls_back_to_sdpa_where_flex_cannot_run_but_explicit_flex_fails(monkeypatch, caplog):
    def broken(device):
        raise RuntimeError("triton: no C compiler")

    monkeypatch.setattr(flex, "_probe", broken)
    with caplog.at_level(logging.WARNING, logger="cptron.models.flex"):
        assert choose_attention("auto", CUDA, masked=True) == "sdpa"
    assert "training.attention=auto: FlexAttention cannot run here" in caplog.text
    assert "triton: no C compiler" in caplog.text
    with pytest.raises(ConfigError, match=r"training.attention='flex' is invalid on cuda: .*no C compiler"):
        choose_attention("flex", CUDA, masked=True)
    with pytest.raises(ConfigError, match="training.attention='flex' is invalid on cpu with parallel.compile"):
        choose_attention("flex", CPU, masked=True, compiled=True)


def test_log_line_names_the_kernel_auto_chose():
    mc = model_config_from_preset("tiny")
    on_gpu = attention_description(True, CUDA, mc, "auto")
    assert on_gpu.startswith("FlexAttention with a block-sparse document causal mask (torch.compile'd kernel)")
    assert on_gpu.endswith("[training.attention=auto]")
    assert attention_description(False, CUDA, mc, "auto").startswith("SDPA causal (is_causal: flash kernel")
    on_cpu = attention_description(True, CPU, mc, "sdpa", requested="auto")
    assert on_cpu.startswith("SDPA with a boolean block-diagonal causal mask")
    assert on_cpu.endswith("[training.attention=auto]")
    assert "[training" not in attention_description(True, CPU, mc, "flex", requested="flex")


def _start_default_trainer(rank, world_size, run_dir, document_masking):
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("cptron.train").addHandler(handler)
    logging.getLogger("cptron.train").setLevel(logging.INFO)
    cfg = make_train_config(run_dir, ParallelConfig(), document_masking=document_masking)
    assert cfg.training.attention == "auto"  # the default
    trainer = Trainer(cfg, data_factory=lambda r, n: (PackedSource(16, 8, r, n), {}))
    return [p.attention_impl for p in trainer.parts], [m for m in messages if "attention:" in m]


def test_default_trainer_on_cpu_keeps_sdpa_and_logs_it(tmp_path):
    impls, lines = run_distributed(_start_default_trainer, 1, str(tmp_path), True)[0]
    assert impls == ["sdpa"]
    assert len(lines) == 1 and "attention: SDPA with a boolean block-diagonal causal mask" in lines[0], lines
    assert lines[0].endswith("[training.attention=auto]")


def test_flex_outside_a_compiled_model_goes_through_the_cached_compiled_kernel(monkeypatch):
    kernel = flex._compiled()
    assert flex._compiled() is kernel  # compiled once per process, lazily
    calls = []
    monkeypatch.setattr(flex, "_compiled_flex_attention", lambda q, k, v, **kw: calls.append(kw) or q)
    q, kv = torch.empty(1, 4, 8, 16, device="meta"), torch.empty(1, 2, 8, 16, device="meta")
    flex.flex_attention_forward(q, kv, kv, block_mask="mask")  # a non-CPU device
    assert calls == [{"block_mask": "mask", "enable_gqa": True}]


def test_memory_plan_counts_the_boolean_mask_only_where_sdpa_runs():
    cfg = make_train_config("unused", ParallelConfig(), seq_len=1024)
    cfg.model.max_seq_len = 1024
    gpu_auto = estimate_memory(cfg, 1, "cuda").peak
    cfg.training.attention = "sdpa"
    gpu_sdpa = estimate_memory(cfg, 1, "cuda").peak
    assert gpu_sdpa > gpu_auto  # auto is flex on cuda: no T x T mask kept per layer


@pytest.mark.gpu
def test_auto_takes_flex_on_a_real_gpu():
    """The probe runs here for real: the compiled kernel, forward and backward, against SDPA."""
    assert choose_attention("auto", CUDA, masked=True, compiled=True) == "flex"
    assert choose_attention("auto", CUDA, masked=False) == "sdpa"
