"""The model on CUDA against transformers on CUDA (skipped without a GPU)."""
import pytest
import torch
import transformers

from cptron import checkpoint as ckpt
from cptron.hf import convert_hf_to_cptron

pytestmark = pytest.mark.gpu


@pytest.fixture
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _llama(tmp_path):
    cfg = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    convert_hf_to_cptron(tmp_path / "hf", tmp_path / "cp", pad_vocab_to_multiple_of=128, progress=False)
    return hf


@torch.no_grad()
def test_fp32_logits_match_transformers_on_cuda(tmp_path, no_tf32):
    hf = _llama(tmp_path).cuda()
    model = ckpt.load_model(tmp_path / "cp", device="cuda").eval()
    tokens = torch.randint(0, 1000, (2, 256), device="cuda")
    assert (model(tokens)[..., :1000] - hf(tokens).logits).abs().max().item() < 1e-4


@torch.no_grad()
def test_bf16_logits_track_transformers_bf16_on_cuda(tmp_path):
    hf = _llama(tmp_path).cuda().to(torch.bfloat16)
    model = ckpt.load_model(tmp_path / "cp", device="cuda", dtype=torch.bfloat16).eval()
    tokens = torch.randint(0, 1000, (2, 256), device="cuda")
    ours, theirs = model(tokens)[..., :1000].float(), hf(tokens).logits.float()
    # Both run bf16 kernels; they agree to bf16 resolution, not bit for bit.
    assert (ours - theirs).abs().max().item() < 5e-2
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() > 0.95


@torch.no_grad()
def test_packed_documents_on_cuda_match_separate_runs(tmp_path, no_tf32):
    hf = _llama(tmp_path).cuda()
    model = ckpt.load_model(tmp_path / "cp", device="cuda").eval()
    tokens = torch.randint(0, 1000, (1, 200), device="cuda")
    doc_ids = torch.cat([torch.zeros(1, 77), torch.ones(1, 123)], 1).long().cuda()
    packed = model(tokens, doc_ids=doc_ids)[..., :1000]
    assert (packed[:, :77] - hf(tokens[:, :77]).logits).abs().max().item() < 1e-4
    assert (packed[:, 77:] - hf(tokens[:, 77:]).logits).abs().max().item() < 1e-4
