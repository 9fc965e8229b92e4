"""The Llama-family model on its own: initialization, packing, masking, presets."""
import pytest
import torch

from cptron.errors import ConfigError
from cptron.models.config import PRESETS, ModelConfig, model_config_from_preset
from cptron.models.llama import Transformer, build_attention_mask, build_model, positions_and_segments


def tiny(**kw) -> ModelConfig:
    return model_config_from_preset("tiny", **kw)


def test_init_is_a_function_of_the_seed_only():
    a = build_model(tiny(), seed=3)
    b = build_model(tiny(), seed=3)
    c = build_model(tiny(), seed=4)
    for (name, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name


def test_init_does_not_depend_on_which_layers_a_stage_holds():
    full = build_model(tiny(n_layers=4), seed=7)
    stage = build_model(tiny(n_layers=4), seed=None)
    for key in ("0", "1"):
        del stage.layers[key]
    stage.tok_embeddings = None
    stage.init_weights(7)
    full_params = dict(full.named_parameters())
    for name, p in stage.named_parameters():
        assert torch.equal(p, full_params[name]), name


def test_init_statistics_and_padding():
    cfg = tiny(vocab_size=1000, pad_vocab_to_multiple_of=64, n_layers=8)
    model = build_model(cfg, seed=0)
    emb = model.tok_embeddings.weight
    assert emb.shape[0] == 1024 and torch.count_nonzero(emb[1000:]) == 0
    assert abs(emb[:1000].std().item() - cfg.init_std) < 2e-3
    wo = model.layers["0"].attention.wo.weight
    assert abs(wo.std().item() - cfg.init_std / 4.0) < 1e-3  # 1 / sqrt(2 * 8 layers)
    assert torch.equal(model.norm.weight, torch.ones(cfg.dim))


def test_tied_embeddings_share_storage_after_materialization_and_dtype_change():
    model = build_model(tiny(tie_embeddings=True), seed=0, dtype=torch.bfloat16)
    assert model.output.weight is model.tok_embeddings.weight
    assert model.rope_inv_freq.dtype == torch.float32, "rotary frequencies must stay fp32"
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})


def test_positions_restart_per_document_and_runs_are_separate():
    doc_ids = torch.tensor([[4, 4, 4, 9, 9, 4, 4]])
    pos, seg = positions_and_segments(doc_ids)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert seg.tolist() == [[1, 1, 1, 2, 2, 3, 3]]


def test_attention_mask_is_block_diagonal_causal_with_sliding_window():
    seg = torch.tensor([[1, 1, 1, 2, 2]])
    mask = build_attention_mask(5, "cpu", seg, sliding_window=2)[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert build_attention_mask(5, "cpu", None, None) is None
    assert build_attention_mask(5, "cpu", None, sliding_window=8) is None


def test_packed_sequence_equals_documents_run_alone():
    model = build_model(tiny(), seed=1).eval()
    a, b = torch.randint(0, 2048, (1, 7)), torch.randint(0, 2048, (1, 9))
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), doc_ids=torch.tensor([[0] * 7 + [1] * 9]))
        assert torch.allclose(packed[:, :7], model(a), atol=1e-5)
        assert torch.allclose(packed[:, 7:], model(b), atol=1e-5)


def test_a_stage_without_embeddings_takes_hidden_states():
    model = build_model(tiny(), seed=2).eval()
    tokens = torch.randint(0, 2048, (2, 10))
    with torch.no_grad():
        full = model(tokens)
        h = model.tok_embeddings(tokens)
        model.tok_embeddings = None
        assert torch.equal(model(h), full)


def test_gradients_flow_to_every_parameter():
    model = build_model(tiny(qkv_bias=True), seed=0)
    logits = model(torch.randint(0, 2048, (2, 12)))
    logits.float().logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("name, billions", [
    ("llama2-7b", 6.74), ("llama3-8b", 8.03), ("llama3.1-8b", 8.03), ("llama3.2-1b", 1.24),
    ("mistral-7b", 7.24), ("qwen2.5-0.5b", 0.494)])
def test_presets_match_published_parameter_counts(name, billions):
    assert abs(model_config_from_preset(name).num_params() / 1e9 - billions) / billions < 0.01


def test_tiny_preset_is_a_few_hundred_thousand_parameters():
    model = build_model(model_config_from_preset("tiny"), seed=0)
    n = sum(p.numel() for p in model.parameters())
    assert n == model.cfg.num_params() and 1e5 < n < 1e6


def test_meta_construction_of_a_large_preset_allocates_nothing():
    with torch.device("meta"):
        model = Transformer(model_config_from_preset("llama3-8b"))
    assert all(p.is_meta for p in model.parameters())
    assert set(PRESETS) >= {"tiny", "llama2-7b", "llama3-8b", "llama3.2-1b", "mistral-7b", "qwen2.5-0.5b"}


@pytest.mark.parametrize("kw, field", [
    ({"n_heads": 4, "n_kv_heads": 3}, "model.n_kv_heads"),
    ({"dim": 66, "n_heads": 4}, "model.dim"),
    ({"sliding_window": 0}, "model.sliding_window"),
    ({"norm_eps": 0.0}, "model.norm_eps"),
])
def test_impossible_architectures_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        tiny(**kw)


def test_a_tied_last_stage_initializes_its_output_like_the_first_stage_embedding():
    cfg = tiny(tie_embeddings=True, n_layers=4)
    first = build_model(cfg, seed=9)
    last = build_model(cfg, seed=None)
    last.tok_embeddings = None  # the last pipeline stage keeps only `output`
    last.init_weights(9)
    assert torch.equal(last.output.weight, first.tok_embeddings.weight)


def test_padded_vocabulary_keeps_soft_losses_finite():
    model = build_model(tiny(vocab_size=2000, pad_vocab_to_multiple_of=64), seed=0)
    logits = model(torch.randint(0, 2000, (2, 8)))
    assert logits.shape[-1] == 2048
    targets = torch.randint(0, 2000, (16,))
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets, label_smoothing=0.1)
    logp = logits.log_softmax(-1)
    assert torch.isfinite(loss) and torch.isfinite((logp.exp() * logp).sum())


@pytest.mark.parametrize("kw, field", [
    ({"family": "gemma"}, "model.family"),
    ({"rope_type": "yarn"}, "model.rope_type"),
    ({"family": "llama", "sliding_window": 16}, "model.sliding_window"),
])
def test_fields_set_from_python_are_validated_too(kw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ModelConfig(**kw).validate()
