"""HF <-> cptron conversion: logits parity with transformers, bit-exact round trips, clear refusals."""
import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from cptron import checkpoint as ckpt
from cptron.errors import CheckpointError, ConversionError
from cptron.hf import compare_with_transformers, convert_cptron_to_hf, convert_hf_to_cptron
from cptron.hf_config import model_config_from_hf

VOCAB = 300

# Small but complete versions of each supported family: GQA everywhere, llama3 rope
# scaling whose original context (16) is shorter than the test sequences, a Mistral
# sliding window shorter than the sequence, Qwen2's q/k/v bias and tied embeddings.
FAMILIES = {
    "llama3": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=128, sliding_window=6)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, rope_theta=1e6)),
}


def make_hf(family: str, path, seed: int = 0, dtype=torch.float32, **save_kwargs):
    torch.manual_seed(seed)
    model = FAMILIES[family]().to(dtype).eval()
    with torch.no_grad():  # make the q/k/v biases non-zero so they are really tested
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path, **save_kwargs)
    return model


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


def test_logits_match_transformers(family, tmp_path):
    hf = make_hf(family, tmp_path / "hf")
    convert_hf_to_cptron(tmp_path / "hf", tmp_path / "cp", pad_vocab_to_multiple_of=64, progress=False)
    model = ckpt.load_model(tmp_path / "cp").eval()
    assert model.cfg.padded_vocab_size == 320 and model.cfg.vocab_size == VOCAB
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens).logits
    assert (ours[..., :VOCAB] - theirs).abs().max().item() < 1e-5
    assert torch.equal(ours[..., VOCAB:], torch.zeros_like(ours[..., VOCAB:])), "padded rows must stay zero"


def test_packed_documents_match_separate_runs(family, tmp_path):
    hf = make_hf(family, tmp_path / "hf")
    convert_hf_to_cptron(tmp_path / "hf", tmp_path / "cp", progress=False)
    model = ckpt.load_model(tmp_path / "cp").eval()
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    doc_ids = torch.tensor([[0] * 9 + [1] * 11, [5] * 13 + [6] * 7])
    with torch.no_grad():
        packed = model(tokens, doc_ids=doc_ids)
        for b, cut in ((0, 9), (1, 13)):
            first = hf(tokens[b:b + 1, :cut]).logits[0]
            second = hf(tokens[b:b + 1, cut:]).logits[0]
            assert (packed[b, :cut] - first).abs().max().item() < 1e-5
            assert (packed[b, cut:] - second).abs().max().item() < 1e-5


def test_round_trip_is_bit_identical_and_loads_in_transformers(family, tmp_path):
    from cptron.testing.fixtures import train_bpe_tokenizer

    hf = make_hf(family, tmp_path / "hf", max_shard_size="40KB")  # several input shards
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    train_bpe_tokenizer(tmp_path / "hf", vocab_size=VOCAB)
    convert_hf_to_cptron(tmp_path / "hf", tmp_path / "cp", pad_vocab_to_multiple_of=128, progress=False)
    convert_cptron_to_hf(tmp_path / "cp", tmp_path / "out", max_shard_size="50KB", progress=False)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "out" / "generation_config.json").is_file()

    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(back) is type(hf)
    original, exported = hf.state_dict(), back.state_dict()
    assert set(original) == set(exported)
    for name, tensor in original.items():
        assert torch.equal(tensor, exported[name]), name
    for key in ("vocab_size", "num_key_value_heads", "rope_parameters", "tie_word_embeddings", "sliding_window"):
        assert getattr(back.config, key, None) == getattr(hf.config, key, None), key
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.decode(tok("In the beginning")["input_ids"], skip_special_tokens=True) == "In the beginning"
    assert compare_with_transformers(tmp_path / "cp", tmp_path / "out", seq_len=16) < 1e-5


def test_bf16_is_kept_and_round_trips_exactly(tmp_path):
    hf = make_hf("llama3", tmp_path / "hf", dtype=torch.bfloat16)
    convert_hf_to_cptron(tmp_path / "hf", tmp_path / "cp", progress=False)
    stored = ckpt.tensor_metadata(tmp_path / "cp")
    assert {dt for _, dt in stored.values()} == {torch.bfloat16}
    convert_cptron_to_hf(tmp_path / "cp", tmp_path / "out", progress=False)
    exported = load_file(tmp_path / "out" / "model.safetensors")
    for name, tensor in hf.state_dict().items():
        assert exported[name].dtype == torch.bfloat16 and torch.equal(exported[name], tensor), name
    assert json.loads((tmp_path / "out" / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"


def test_dtype_option_casts(tmp_path):
    make_hf("qwen2", tmp_path / "hf")
    convert_hf_to_cptron(tmp_path / "hf", tmp_path / "cp", dtype="bfloat16", progress=False)
    assert {dt for _, dt in ckpt.tensor_metadata(tmp_path / "cp").values()} == {torch.bfloat16}
    assert ckpt.MODEL_PREFIX + "output.weight" not in ckpt.tensor_metadata(tmp_path / "cp"), \
        "tied output weight must be stored once"


def test_legacy_transformers4_config_keys_are_understood():
    cfg = model_config_from_hf({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 300,
        "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": True, "max_position_embeddings": 131072})
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_theta, cfg.tie_embeddings) == ("llama3", 32.0, 500000.0, True)


# ------------------------------------------------------------------ refusals

def _config(path):
    return json.loads((path / "config.json").read_text())


def _write_config(path, cfg):
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_shard_is_named(tmp_path):
    make_hf("llama3", tmp_path / "hf", max_shard_size="40KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "hf" / victim).unlink()
    with pytest.raises(ConversionError, match=f"shard .*{victim}.* is missing"):
        convert_hf_to_cptron(tmp_path / "hf", tmp_path / "cp", progress=False)
    assert not (tmp_path / "cp").exists()


def test_wrong_shape_is_named(tmp_path):
    make_hf("llama3", tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*shape \[95, 64\].*\[96, 64\]"):
        convert_hf_to_cptron(tmp_path / "hf", tmp_path / "cp", progress=False)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    make_hf("llama3", tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"missing.*model\.layers\.0\.self_attn\.k_proj\.weight"):
        convert_hf_to_cptron(tmp_path / "hf", tmp_path / "cp", progress=False)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    tensors["model.vision_tower.proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"model\.vision_tower\.proj\.weight"):
        convert_hf_to_cptron(tmp_path / "hf", tmp_path / "cp", progress=False)


@pytest.mark.parametrize("edit, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "architecture 'GPT2LMHeadModel' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope type 'yarn' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"num_key_value_heads": 3}, "n_kv_heads"),
])
def test_unsupported_configs_are_refused(tmp_path, edit, message):
    make_hf("llama3", tmp_path / "hf")
    cfg = _config(tmp_path / "hf")
    cfg.pop("rope_scaling", None)
    cfg.update(edit)
    _write_config(tmp_path / "hf", cfg)
    with pytest.raises(ConversionError, match=message):
        convert_hf_to_cptron(tmp_path / "hf", tmp_path / "cp", progress=False)


def test_bin_weights_are_refused_with_a_hint(tmp_path):
    make_hf("llama3", tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save({}, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="only safetensors"):
        convert_hf_to_cptron(tmp_path / "hf", tmp_path / "cp", progress=False)


def test_existing_output_and_incomplete_checkpoint_are_refused(tmp_path):
    make_hf("llama3", tmp_path / "hf")
    convert_hf_to_cptron(tmp_path / "hf", tmp_path / "cp", progress=False)
    with pytest.raises(ConversionError, match="already exists"):
        convert_hf_to_cptron(tmp_path / "hf", tmp_path / "cp", progress=False)
    convert_hf_to_cptron(tmp_path / "hf", tmp_path / "cp", overwrite=True, progress=False)
    shutil.copytree(tmp_path / "cp", tmp_path / "broken")
    (tmp_path / "broken" / ckpt.COMPLETE_MARKER).unlink()
    with pytest.raises(CheckpointError, match="broken is incomplete"):
        convert_cptron_to_hf(tmp_path / "broken", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_absent_keys_take_transformers_defaults():
    cfg = model_config_from_hf({"architectures": ["MistralForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
                                "num_attention_heads": 8, "intermediate_size": 96, "vocab_size": 300})
    defaults = transformers.MistralConfig()
    assert cfg.sliding_window == defaults.sliding_window == 4096
    assert cfg.kv_heads == defaults.num_key_value_heads
    assert cfg.max_seq_len == defaults.max_position_embeddings


def test_incomplete_rope_scaling_names_config_json():
    with pytest.raises(ConversionError, match="config.json"):
        model_config_from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "intermediate_size": 96, "vocab_size": 300,
                              "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


def test_index_naming_a_tensor_absent_from_its_shard(tmp_path):
    make_hf("llama3", tmp_path / "hf", max_shard_size="40KB")
    index_path = tmp_path / "hf" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"]["model.norm.weight"] = next(s for s in shards if s != index["weight_map"]["model.norm.weight"])
    index_path.write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"'model\.norm\.weight' is not in .*safetensors"):
        convert_hf_to_cptron(tmp_path / "hf", tmp_path / "cp", progress=False)


def test_checkpoint_with_unknown_model_fields_names_cptron_json(tmp_path):
    make_hf("qwen2", tmp_path / "hf")
    convert_hf_to_cptron(tmp_path / "hf", tmp_path / "cp", progress=False)
    meta_path = tmp_path / "cp" / ckpt.META_FILE
    meta = json.loads(meta_path.read_text())
    meta["model"]["qk_norm"] = True
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"cptron\.json: model fields \['qk_norm'\]"):
        convert_cptron_to_hf(tmp_path / "cp", tmp_path / "out", progress=False)
