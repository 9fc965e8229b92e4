"""Factorized embeddings (OFA): the lookup, the SVD factorization, the model, conversion and parameter counts.

Tolerances: fp32 throughout; 1e-5 absolute on logits, losses and gradients (the project's parity
standard), 1e-4 relative on reconstructions by SVD (float64 SVD, fp32 factors).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from safetensors import safe_open

from cptron import checkpoint as ckpt
from cptron.cli import InitConfig, run_init
from cptron.config import config_to_dict
from cptron.errors import ConfigError
from cptron.hf import compare_export, convert_cptron_to_hf, convert_hf_to_cptron
from cptron.hf_factors import FACTORS_FILE
from cptron.kernels.factorized_embedding import factorized_embedding, factorized_embedding_reference
from cptron.models.config import model_config_from_preset
from cptron.models.factorized import reconstruction_error, svd_factorize
from cptron.models.llama import Transformer, build_model
from cptron.train.optim import OptimizerConfig
from cptron.train.param_groups import resolve_trainable

VOCAB = 300


def tiny(**fields):
    base = dict(n_layers=2, vocab_size=VOCAB, pad_vocab_to_multiple_of=64, max_seq_len=64)
    return model_config_from_preset("tiny", **{**base, **fields})


def test_lookup_matches_gathering_rows_of_the_product():
    g = torch.Generator().manual_seed(0)
    coords = torch.randn(50, 6, generator=g, requires_grad=True)
    basis = torch.randn(6, 16, generator=g, requires_grad=True)
    ids = torch.randint(0, 50, (3, 7), generator=g)
    out = factorized_embedding(ids, coords, basis)
    dense = (coords @ basis).detach().requires_grad_()
    expected = dense[ids]
    assert out.shape == (3, 7, 16)
    assert (out - expected).abs().max().item() < 1e-5
    assert torch.equal(out, factorized_embedding_reference(ids, coords, basis))
    upstream = torch.randn(out.shape, generator=g)
    out.backward(upstream)
    expected.backward(upstream)
    # chain rule through W = P B: dP = dW B^T, dB = P^T dW
    assert (coords.grad - dense.grad @ basis.detach().T).abs().max().item() < 1e-5
    assert (basis.grad - coords.detach().T @ dense.grad).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="do not chain"):
        factorized_embedding(ids, coords, torch.randn(5, 16))


def test_svd_is_exact_at_full_rank_and_for_rank_deficient_matrices():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 12, generator=g)
    p, b = svd_factorize(w, 12)
    assert p.shape == (40, 12) and b.shape == (12, 12)
    assert reconstruction_error(w, p, b) < 1e-6
    assert torch.allclose(b @ b.T, torch.eye(12), atol=1e-5)  # orthonormal basis rows
    low = torch.randn(40, 3, generator=g) @ torch.randn(3, 12, generator=g)  # rank 3
    for r in (3, 5):
        assert reconstruction_error(low, *svd_factorize(low, r)) < 1e-6
    errors = [reconstruction_error(w, *svd_factorize(w, r)) for r in (2, 4, 8, 12)]
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.3
    with pytest.raises(ValueError, match="rank=13"):
        svd_factorize(w, 13)


@pytest.mark.parametrize(
    "fields",
    [
        dict(embedding_rank=8),
        dict(embedding_rank=8, factorize_head=True),
        dict(embedding_rank=8, factorize_head=True, tie_embeddings=True),
    ],
    ids=["embedding", "embedding_and_head", "tied"],
)
def test_factorized_model_matches_the_materialized_model(fields):
    """Same logits, loss and (by the chain rule) gradients as the ordinary model holding P @ B."""
    cfg = tiny(**fields)
    model = build_model(cfg, seed=3)
    assert set(dict(model.named_parameters())) >= {"tok_embeddings.coordinates.weight", "tok_embeddings.basis.weight"}
    emb, head = model.tok_embeddings, model.output
    assert emb.coordinates.weight[VOCAB:].abs().max().item() == 0  # padded rows are not tokens
    dense = build_model(dataclasses.replace(cfg, embedding_rank=None, factorize_head=False), seed=None)
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if name == "tok_embeddings.weight":
                p.copy_(emb.coordinates.weight @ emb.basis.weight)
            elif name == "output.weight":
                p.copy_(head.coordinates.weight @ head.basis.weight if cfg.factorize_head else head.weight)
            else:
                p.copy_(model.get_parameter(name))
    g = torch.Generator().manual_seed(1)
    tokens, labels = torch.randint(0, VOCAB, (2, 12), generator=g), torch.randint(0, VOCAB, (2, 12), generator=g)
    losses = []
    for m in (model, dense):
        loss = torch.nn.functional.cross_entropy(m(tokens)[..., :VOCAB].flatten(0, 1), labels.flatten())
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-5
    # Tied: the dense model's one W already has the gradient of both uses, as P and B must.
    assert (dense.output.weight is dense.tok_embeddings.weight) == cfg.tie_embeddings
    dw, dh = dense.tok_embeddings.weight.grad, dense.output.weight.grad
    p_grad = dw @ emb.basis.weight.detach().T
    b_grad = emb.coordinates.weight.detach().T @ dw
    if cfg.factorize_head and not cfg.tie_embeddings:
        assert (head.coordinates.weight.grad - dh @ head.basis.weight.detach().T).abs().max() < 1e-5
        assert (head.basis.weight.grad - head.coordinates.weight.detach().T @ dh).abs().max() < 1e-5
    assert (emb.coordinates.weight.grad - p_grad).abs().max().item() < 1e-5
    assert (emb.basis.weight.grad - b_grad).abs().max().item() < 1e-5
    for name, p in dense.named_parameters():
        if name not in ("tok_embeddings.weight", "output.weight"):
            assert (p.grad - model.get_parameter(name).grad).abs().max().item() < 1e-5, name


def test_export_loads_in_transformers_and_imports_back(tmp_path):
    cfg = tiny(embedding_rank=8, factorize_head=True)
    model = build_model(cfg, seed=0).eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    ckpt.write_checkpoint(tmp_path / "cp", {"model": params}, {"model": config_to_dict(cfg), "step": 0})
    convert_cptron_to_hf(tmp_path / "cp", tmp_path / "hf", progress=False)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", use_safetensors=True).eval()
    assert hf.model.embed_tokens.weight.shape == (VOCAB, cfg.dim)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens)[..., :VOCAB]
        assert (hf(tokens).logits - ours).abs().max().item() < 1e-5
    assert compare_export(tmp_path / "cp", tmp_path / "hf").diff < 1e-5
    with safe_open(tmp_path / "hf" / FACTORS_FILE, framework="pt") as f:
        assert f.metadata()["rank"] == "8"
        assert torch.equal(f.get_tensor("lm_head.basis"), params["output.basis.weight"])

    # Same rank: the factors file gives the factors back bit-exactly.
    convert_hf_to_cptron(
        tmp_path / "hf",
        tmp_path / "back",
        pad_vocab_to_multiple_of=64,
        progress=False,
        embedding_rank=8,
        factorize_head=True,
    )
    back = ckpt.load_model(tmp_path / "back")
    for name, p in back.named_parameters():
        assert torch.equal(p, params[name]), name
    # Another rank: truncated SVD of the materialized matrices, exact since their rank is 8 <= 12.
    convert_hf_to_cptron(
        tmp_path / "hf", tmp_path / "svd", pad_vocab_to_multiple_of=64, progress=False, embedding_rank=12
    )
    svd = ckpt.load_model(tmp_path / "svd").eval()
    assert svd.tok_embeddings.basis.weight.shape == (12, cfg.dim)
    with torch.no_grad():
        assert (svd(tokens)[..., :VOCAB] - ours).abs().max().item() < 1e-5


def test_param_counts_of_llama3_8b_from_the_meta_device(capsys):
    full = model_config_from_preset("llama3-8b")
    rows = []
    for r in (100, 200, 400):
        for head in (False, True):
            cfg = dataclasses.replace(full, embedding_rank=r, factorize_head=head)
            with torch.device("meta"):
                counted = sum(p.numel() for p in Transformer(cfg).parameters())
            assert counted == cfg.num_params()
            emb, _ = cfg.embedding_params()
            assert emb == 128256 * r + r * 4096
            rows.append((r, head, counted))
    assert rows[0][2] == full.num_params() - 128256 * 4096 + 128256 * 100 + 100 * 4096
    run_init(InitConfig(model=dataclasses.replace(full, embedding_rank=100), dry_run=True))
    out = capsys.readouterr().out
    assert "embedding factorized at rank 100: 13,235,200 instead of 525,336,576" in out
    assert f"{rows[0][2]:,}" in out


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(embedding_rank=0), "model.embedding_rank=0"),
        (dict(embedding_rank=65), "model.embedding_rank=65"),
        (dict(factorize_head=True), "model.factorize_head=True"),
        (dict(embedding_rank=8, tie_embeddings=True), "model.factorize_head=False"),
    ],
)
def test_impossible_settings_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        tiny(**fields)


def test_new_rows_only_is_refused_and_frozen_factors_are_named():
    cfg = tiny(embedding_rank=8)
    with pytest.raises(ConfigError, match="optim.train_new_rows_only=True"):
        resolve_trainable(OptimizerConfig(train_new_rows_only=True, new_rows_from=10), cfg)
    plan = resolve_trainable(OptimizerConfig(frozen=["tok_embeddings.basis.weight"]), cfg)
    assert plan.frozen == {"tok_embeddings.basis.weight"}


def test_a_run_from_an_hf_model_takes_the_rank_from_its_model_section_and_the_width_from_the_weights(tmp_path):
    """The model section's width (default 64) is not the architecture when checkpoint.init_from is an HF
    directory: a rank above it but within the HF model's width is valid, one above that is refused."""
    from cptron.config import parse_config
    from cptron.train.config import JobConfig
    from cptron.train.initial_weights import model_config_for_init

    wide = tiny(dim=128, n_heads=4)
    model = build_model(wide, seed=0)
    params = {n: p.detach() for n, p in model.named_parameters()}
    ckpt.write_checkpoint(tmp_path / "cp", {"model": params}, {"model": config_to_dict(wide), "step": 0})
    convert_cptron_to_hf(tmp_path / "cp", tmp_path / "hf", progress=False)
    job = parse_config(
        JobConfig,
        ["--checkpoint.init_from", str(tmp_path / "hf"), "--model.embedding_rank", "100", "--model.factorize_head", "true"],
    )
    assert model_config_for_init(tmp_path / "hf", 64, job.model).embedding_rank == 100
    job.model.embedding_rank = 129
    with pytest.raises(Exception, match=r"model.embedding_rank=129 is invalid: expected None or an integer in \[1, model.dim=128\]"):
        model_config_for_init(tmp_path / "hf", 64, job.model)
    with pytest.raises(ConfigError, match="model.embedding_rank=100"):  # without init_from the section is the model
        parse_config(JobConfig, ["--model.embedding_rank", "100"])
