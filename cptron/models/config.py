"""Architecture of a Llama-family decoder, and the named presets.

One flat dataclass describes Llama 2/3/3.1/3.2, Mistral and Qwen2-style models.
Each field carries a one-line docstring (read by `cptron <cmd> --help`).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Literal, Optional

from cptron.errors import ConfigError, require


@dataclass
class ModelConfig:
    """Llama-family decoder architecture."""

    preset: Optional[str] = None
    """Start from this named preset (tiny, llama2-7b, llama3-8b, llama3.1-8b, llama3.2-1b, mistral-7b, qwen2.5-0.5b); other fields override it."""
    family: Literal["llama", "mistral", "qwen2"] = "llama"
    """Hugging Face architecture the model exports as (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)."""
    dim: int = 64
    """Hidden size (d_model)."""
    n_layers: int = 2
    """Number of transformer blocks."""
    n_heads: int = 4
    """Number of query heads."""
    n_kv_heads: Optional[int] = None
    """Number of key/value heads (grouped-query attention); None means n_heads."""
    head_dim: Optional[int] = None
    """Per-head size; None means dim // n_heads."""
    ffn_hidden_dim: int = 176
    """Inner size of the SwiGLU MLP (HF intermediate_size)."""
    vocab_size: int = 2048
    """Number of real tokens in the vocabulary."""
    pad_vocab_to_multiple_of: int = 1
    """Pad the embedding and output rows to a multiple of this (for tensor parallelism and kernels); padded logits are masked."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base wavelength."""
    rope_type: Literal["default", "linear", "llama3"] = "default"
    """RoPE frequency scaling: default (none), linear (position interpolation) or llama3 (Llama 3.1 wavelength-dependent)."""
    rope_factor: float = 1.0
    """Scaling factor of the linear and llama3 rope types."""
    rope_low_freq_factor: float = 1.0
    """llama3 rope: wavelengths above original_max_position_embeddings / low_freq_factor are divided by rope_factor."""
    rope_high_freq_factor: float = 4.0
    """llama3 rope: wavelengths below original_max_position_embeddings / high_freq_factor are kept."""
    rope_original_max_position_embeddings: int = 8192
    """llama3 rope: context length of the model before scaling."""
    max_seq_len: int = 2048
    """Longest sequence the model is meant for (HF max_position_embeddings)."""
    tie_embeddings: bool = False
    """Share the input embedding matrix with the output projection."""
    embedding_rank: Optional[int] = None
    """Factorize the input embedding as coordinates (vocab x r) @ basis (r x dim) at this rank r (OFA, Liu et al. 2023); None keeps the full matrix."""
    factorize_head: bool = False
    """Factorize the LM head likewise (logits = (h basis^T) coordinates^T); needs embedding_rank, and tied models need it."""
    qkv_bias: bool = False
    """Add a bias to the q/k/v projections (Qwen2)."""
    sliding_window: Optional[int] = None
    """Each token attends to at most this many most recent tokens (itself included); None means full causal attention."""
    init_std: float = 0.02
    """Standard deviation of the normal initialization; output projections are scaled by 1/sqrt(2 * n_layers)."""

    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        """The named preset from PRESETS, validated (used by cptron.config for `--model.preset`)."""
        return model_config_from_preset(name)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_to_multiple_of
        return int(math.ceil(self.vocab_size / m) * m)

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count (the padded vocabulary counts; tied weights count once)."""
        d, hd = self.dim, self.head_size
        q, kv = self.n_heads * hd, self.kv_heads * hd
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.qkv_bias else 0)
        mlp = 3 * d * self.ffn_hidden_dim
        total = self.n_layers * (attn + mlp + 2 * d) + d
        emb, head = self.embedding_params()
        if include_embedding:
            total += emb
        return total + head

    def embedding_params(self) -> tuple[int, int]:
        """(input embedding parameters, LM head parameters not shared with it): coordinates plus basis
        where factorized, else the padded vocabulary times dim; a tied head adds 0."""
        full = self.padded_vocab_size * self.dim
        r = self.embedding_rank
        factorized = full if r is None else self.padded_vocab_size * r + r * self.dim
        if self.tie_embeddings:
            return factorized, 0
        return factorized, factorized if self.factorize_head else full

    def validate(self) -> None:
        """Raise ConfigError naming the first field whose value is impossible."""
        for name in ("family", "rope_type"):  # Literal fields set from Python or checkpoint metadata
            allowed = typing.get_args(typing.get_type_hints(ModelConfig)[name])
            value = getattr(self, name)
            require(value in allowed, f"model.{name}", value, f"one of {', '.join(allowed)}")
        for name in (
            "dim",
            "n_layers",
            "n_heads",
            "ffn_hidden_dim",
            "vocab_size",
            "pad_vocab_to_multiple_of",
            "max_seq_len",
            "rope_original_max_position_embeddings",
        ):
            require(getattr(self, name) >= 1, f"model.{name}", getattr(self, name), "an integer >= 1")
        require(self.n_kv_heads is None or self.n_kv_heads >= 1, "model.n_kv_heads", self.n_kv_heads, "None or >= 1")
        require(
            self.n_heads % self.kv_heads == 0,
            "model.n_kv_heads",
            self.n_kv_heads,
            f"a divisor of model.n_heads={self.n_heads}",
        )
        require(
            self.head_dim is None or (self.head_dim >= 2 and self.head_dim % 2 == 0),
            "model.head_dim",
            self.head_dim,
            "None or an even integer >= 2",
        )
        require(
            self.head_dim is not None or self.dim % self.n_heads == 0,
            "model.dim",
            self.dim,
            f"a multiple of model.n_heads={self.n_heads} (or set model.head_dim)",
        )
        require(self.head_size % 2 == 0, "model.head_dim", self.head_size, "an even per-head size (RoPE rotates pairs)")
        require(self.norm_eps > 0, "model.norm_eps", self.norm_eps, "a float > 0")
        require(self.rope_theta > 0, "model.rope_theta", self.rope_theta, "a float > 0")
        require(self.rope_factor > 0, "model.rope_factor", self.rope_factor, "a float > 0")
        if self.rope_type == "llama3":
            require(
                self.rope_high_freq_factor > self.rope_low_freq_factor > 0,
                "model.rope_high_freq_factor",
                self.rope_high_freq_factor,
                f"a float > model.rope_low_freq_factor={self.rope_low_freq_factor} > 0",
            )
        require(
            self.sliding_window is None or self.sliding_window >= 1,
            "model.sliding_window",
            self.sliding_window,
            "None or an integer >= 1",
        )
        # Only Mistral's HF architecture has a uniform sliding window; elsewhere the
        # export would silently become full attention.
        require(
            self.sliding_window is None or self.family == "mistral",
            "model.sliding_window",
            self.sliding_window,
            f"None for model.family={self.family!r} (sliding windows need family 'mistral')",
        )
        require(self.init_std > 0, "model.init_std", self.init_std, "a float > 0")
        # The bound by model.dim is `check_embedding_rank`: with checkpoint.init_from the run's model
        # section gives the rank but the initial weights give the width, so it is checked once both are known.
        require(
            self.embedding_rank is None or self.embedding_rank >= 1,
            "model.embedding_rank",
            self.embedding_rank,
            "None or an integer >= 1",
        )
        require(
            not self.factorize_head or self.embedding_rank is not None,
            "model.factorize_head",
            self.factorize_head,
            "false unless model.embedding_rank is set",
        )
        # Tied models share coordinates and basis: a full head cannot be one parameter with them.
        require(
            not (self.tie_embeddings and self.embedding_rank is not None and not self.factorize_head),
            "model.factorize_head",
            self.factorize_head,
            "true when model.tie_embeddings and model.embedding_rank are both set",
        )

    def check_embedding_rank(self) -> None:
        """A factorization of rank above the width saves nothing: refuse it (the width is final here)."""
        require(
            self.embedding_rank is None or self.embedding_rank <= self.dim,
            "model.embedding_rank",
            self.embedding_rank,
            f"None or an integer in [1, model.dim={self.dim}]",
        )


def _llama3_rope(factor: float) -> dict:
    return dict(
        rope_type="llama3",
        rope_factor=factor,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_max_position_embeddings=8192,
    )


# Published architectures as dataclasses. Values follow each model's released config.json.
PRESETS: dict[str, ModelConfig] = {
    name: ModelConfig(preset=name, **fields)
    for name, fields in {
        "tiny": dict(
            family="llama",
            dim=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            ffn_hidden_dim=176,
            vocab_size=2048,
            max_seq_len=256,
            rope_theta=10000.0,
        ),
        "llama2-7b": dict(
            family="llama",
            dim=4096,
            n_layers=32,
            n_heads=32,
            n_kv_heads=32,
            ffn_hidden_dim=11008,
            vocab_size=32000,
            norm_eps=1e-5,
            rope_theta=10000.0,
            max_seq_len=4096,
        ),
        "llama3-8b": dict(
            family="llama",
            dim=4096,
            n_layers=32,
            n_heads=32,
            n_kv_heads=8,
            ffn_hidden_dim=14336,
            vocab_size=128256,
            norm_eps=1e-5,
            rope_theta=500000.0,
            max_seq_len=8192,
        ),
        "llama3.1-8b": dict(
            family="llama",
            dim=4096,
            n_layers=32,
            n_heads=32,
            n_kv_heads=8,
            ffn_hidden_dim=14336,
            vocab_size=128256,
            norm_eps=1e-5,
            rope_theta=500000.0,
            max_seq_len=131072,
            **_llama3_rope(8.0),
        ),
        "llama3.2-1b": dict(
            family="llama",
            dim=2048,
            n_layers=16,
            n_heads=32,
            n_kv_heads=8,
            ffn_hidden_dim=8192,
            vocab_size=128256,
            norm_eps=1e-5,
            rope_theta=500000.0,
            max_seq_len=131072,
            tie_embeddings=True,
            **_llama3_rope(32.0),
        ),
        "mistral-7b": dict(
            family="mistral",
            dim=4096,
            n_layers=32,
            n_heads=32,
            n_kv_heads=8,
            ffn_hidden_dim=14336,
            vocab_size=32000,
            norm_eps=1e-5,
            rope_theta=10000.0,
            max_seq_len=32768,
            sliding_window=4096,
        ),
        "qwen2.5-0.5b": dict(
            family="qwen2",
            dim=896,
            n_layers=24,
            n_heads=14,
            n_kv_heads=2,
            ffn_hidden_dim=4864,
            vocab_size=151936,
            norm_eps=1e-6,
            rope_theta=1000000.0,
            max_seq_len=32768,
            tie_embeddings=True,
            qkv_bias=True,
        ),
    }.items()
}


def model_config_from_preset(name: str, **overrides) -> ModelConfig:
    """The preset `name` with `overrides` applied, validated."""
    if name not in PRESETS:
        raise ConfigError(f"model.preset={name!r} is unknown: expected one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in overrides:
        if key not in fields:
            raise ConfigError(f"model.{key} is not a field of ModelConfig: expected one of {sorted(fields)}")
    cfg = dataclasses.replace(PRESETS[name], **overrides)
    cfg.validate()
    cfg.check_embedding_rank()
    return cfg
