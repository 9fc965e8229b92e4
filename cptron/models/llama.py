"""Llama-family decoder (Llama 2/3/3.1/3.2, Mistral, Qwen2) with no parallelism inside.

The math follows the Llama papers (Touvron et al. 2023; Grattafiori et al. 2024):
pre-norm RMSNorm blocks, rotary position embeddings (Su et al. 2021), grouped-query
attention (Ainslie et al. 2023) and a SwiGLU MLP (Shazeer 2020).

Conventions that other modules rely on:
- Parameter names are `tok_embeddings`, `layers.<i>.attention.{wq,wk,wv,wo}`,
  `layers.<i>.attention_norm`, `layers.<i>.feed_forward.{w1,w2,w3}` (gate, down, up),
  `layers.<i>.ffn_norm`, `norm`, `output`; with `model.embedding_rank` the embedding (and with
  `model.factorize_head` the head) holds `coordinates` and `basis` (cptron.models.factorized). `layers` is a ModuleDict keyed by the
  layer index, so a pipeline stage can delete the blocks it does not own and keep
  the original names (and thus checkpoint keys).
- q/k projections use the half-split rotary layout of Hugging Face checkpoints
  (rotate the first half of each head against the second half), so HF weights
  load without any row permutation and the round trip is exact by construction.
- Projections reshape heads with -1, so a tensor-parallel plan that shards
  heads across ranks needs no change here.
- A stage whose `tok_embeddings` is None takes hidden states as input; a stage
  whose `output` is None returns hidden states.
- Logits cover the padded vocabulary (`cfg.padded_vocab_size`). Padded rows start
  at zero and are never targets; the model does not mask them, because a mask
  inside forward would fight vocab-parallel sharding and turn soft losses
  (label smoothing, entropy, KL) into inf/nan. Code that turns logits into
  probabilities over tokens (eval, generation, export checks) uses
  `logits[..., :cfg.vocab_size]`, as Megatron-LM does.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cptron._torch_compat import WRAPPER_NAME_SEGMENTS, ConversionHookModule
from cptron.models import factorized, flex
from cptron.models.config import ModelConfig
from cptron.models.init import InitStats, initialize_parameters

# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (float32, length head_dim/2) including rope scaling."""
    dim = cfg.head_size
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    inv_freq = 1.0 / (cfg.rope_theta**exponent)
    if cfg.rope_type == "linear":
        inv_freq = inv_freq / cfg.rope_factor
    elif cfg.rope_type == "llama3":
        # Llama 3.1: keep short wavelengths, divide long ones by the factor, and
        # interpolate smoothly in between.
        factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old_len = cfg.rope_original_max_position_embeddings
        low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin of shape [B, T, head_dim] for integer `positions` [B, T], computed in fp32."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [B, H, T, D] by cos/sin [B, T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


# ----------------------------------------------------------------- packed sequences


def positions_and_segments(doc_ids: torch.Tensor):
    """Positions that restart at each document, and a segment index per token.

    `doc_ids` [B, T] gives each token's document; a document is a maximal run
    of equal ids, so two runs with the same id are still separate documents.
    """
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    segment = starts.cumsum(dim=1)
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx, segment


def build_attention_mask(
    T: int, device, segments: Optional[torch.Tensor] = None, sliding_window: Optional[int] = None
) -> Optional[torch.Tensor]:
    """Boolean mask [B or 1, 1, T, T] (True = attend), or None for plain causal attention.

    Causal, restricted to the same segment (block-diagonal) when `segments` is
    given, and to the last `sliding_window` keys when that is set.
    """
    if segments is None and (sliding_window is None or sliding_window >= T):
        return None
    q = torch.arange(T, device=device)[:, None]
    k = torch.arange(T, device=device)[None, :]
    mask = k <= q
    if sliding_window is not None:
        mask = mask & (q - k < sliding_window)
    mask = mask[None, None]
    if segments is not None:
        mask = mask & (segments[:, None, :, None] == segments[:, None, None, :])
    return mask


def attention_mask_for(
    impl: str, T: int, device, segments: Optional[torch.Tensor] = None, sliding_window: Optional[int] = None
):
    """The mask every layer of one forward shares: None for plain causal attention
    (SDPA's is_causal kernel, whatever `impl`), else a boolean mask for `impl`
    "sdpa" or a FlexAttention BlockMask for "flex" (`cptron.models.flex`)."""
    if impl == "sdpa":
        return build_attention_mask(T, device, segments, sliding_window)
    if impl != "flex":
        raise ValueError(f"attention_impl={impl!r} is invalid: expected 'sdpa' or 'flex'")
    if segments is None and (sliding_window is None or sliding_window >= T):
        return None
    window = sliding_window if sliding_window is not None and sliding_window < T else None
    return flex.build_block_mask(T, device, segments, window)


# ------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the gain, as the Llama reference does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hd = cfg.head_size
        self.head_dim = hd
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        n_rep = q.shape[1] // k.shape[1]
        if mask is None:
            # Plain causal attention lets SDPA share each k/v head with its query
            # group itself (no copy). With a mask, not every SDPA backend accepts
            # enable_gqa, so the heads are expanded explicitly.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_rep > 1)
        elif not isinstance(mask, torch.Tensor):  # a FlexAttention BlockMask
            out = flex.flex_attention_forward(q, k, v, mask)
        else:
            if n_rep > 1:
                k = k.repeat_interleave(n_rep, dim=1)
                v = v.repeat_interleave(n_rep, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 = gate, w3 = up, w2 = down."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden_dim)

    def forward(self, x, cos, sin, mask):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(ConversionHookModule):
    """The decoder. forward(tokens [B, T], doc_ids=None, positions=None) -> logits [B, T, padded_vocab_size].

    `attention_impl` ("sdpa" by default, or "flex") picks the kernel for masked
    attention (packed documents, sliding window); see `attention_mask_for`.
    After every conversion (`to_empty`, `to(dtype)`, device moves) tied embeddings are
    re-tied and the rotary frequencies recomputed in fp32 (`ConversionHookModule`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        cfg.check_embedding_rank()
        self.cfg = cfg
        # nn.Embedding/nn.Linear, or their factorized forms (cptron.models.factorized) with model.embedding_rank.
        self.tok_embeddings: Optional[nn.Module] = factorized.build_embedding(cfg)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg) for i in range(cfg.n_layers)})
        self.norm: Optional[RMSNorm] = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output: Optional[nn.Module] = factorized.build_head(cfg)
        factorized.tie(self, cfg)
        self.register_buffer("rope_inv_freq", rope_inv_freq(cfg), persistent=False)
        # The attention kernel is a runtime choice, not architecture (not in cfg,
        # so not in checkpoints or HF exports): the trainer sets it on every part.
        self.attention_impl = "sdpa"
        # How a forward given labels computes the loss from the final hidden states and the head
        # without the full logits (the trainer's chunked loss, cptron.train.chunked_loss): called as
        # head_loss(h, self.output, labels). Inside forward, so that FSDP2 holds the head's gathered
        # weights while it runs; a runtime choice like attention_impl, never in checkpoints.
        self.head_loss = None

    def forward(
        self,
        tokens: torch.Tensor,
        doc_ids: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ):
        """`tokens`: token ids [B, T] (or hidden states [B, T, dim] on a stage without
        embeddings). `doc_ids` [B, T]: document of each token in a packed sequence;
        positions then restart per document and attention is block-diagonal causal.
        `positions` [B, T] overrides the position ids. A stage without embeddings
        under sequence parallelism must pass doc_ids or positions (they fix T).
        With `labels` [B, T] (and `head_loss` set) a model with a head returns
        `head_loss(h, self.output, labels)` instead of the logits."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        # The sequence length comes from the token ids, or on a later pipeline stage
        # from doc_ids/positions: under sequence parallelism the hidden states this
        # rank holds cover only its slice of the sequence.
        ref = (
            tokens
            if self.tok_embeddings is not None
            else (doc_ids if doc_ids is not None else positions if positions is not None else h)
        )
        B, T = ref.shape[0], ref.shape[1]
        segments = None
        if doc_ids is not None:
            doc_positions, segments = positions_and_segments(doc_ids)
            positions = doc_positions if positions is None else positions
        if positions is None:
            positions = torch.arange(T, device=h.device).expand(B, T)
        cos, sin = rope_cos_sin(self.rope_inv_freq, positions, h.dtype)
        mask = attention_mask_for(self.attention_impl, T, h.device, segments, self.cfg.sliding_window)
        for layer in self.layers.values():
            h = layer(h, cos, sin, mask)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is None:
            return h
        if labels is not None:
            if self.head_loss is None:
                raise ValueError("forward was given labels but the model has no head_loss to compute the loss with")
            return self.head_loss(h, self.output, labels)
        return self.output(h)

    def _after_conversion(self) -> None:
        # Moving off the meta device creates new parameters per module: re-tie.
        factorized.tie(self, self.cfg)
        # Keep the rotary frequencies in fp32 whatever dtype the weights move to:
        # recomputing them is exact, casting them to bf16 is not.
        self.rope_inv_freq = rope_inv_freq(self.cfg).to(self.rope_inv_freq.device)

    @torch.no_grad()
    def init_weights(self, seed: int) -> InitStats:
        """Initialize every parameter as a function of (seed, parameter name) only
        (cptron.models.init): not of module order, of which pipeline stage holds the parameter,
        of the device, or of the layout. A DTensor parameter (FSDP2/TP sharded) draws only the
        tiles of its own shard, so no rank builds a full tensor it does not hold."""
        params = ((canonical_param_name(n), p) for n, p in self.named_parameters())
        return initialize_parameters(params, self.cfg, seed)


def canonical_param_name(name: str) -> str:
    """A parameter's name without the segments that wrappers applied from outside
    (activation checkpointing, torch.compile) insert, i.e. its checkpoint key."""
    for seg in WRAPPER_NAME_SEGMENTS:
        name = name.replace(seg, "")
    return name


def build_model(
    cfg: ModelConfig, seed: Optional[int] = 0, device="cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    """A model on `device`; initialized from `seed`, or left uninitialized when seed is None."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.to(dtype)
    if seed is not None:
        model.init_weights(seed)
    return model
