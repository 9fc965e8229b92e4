"""What Hugging Face names and `config.json` mean in cptron terms, and back.

Maps HF tensor names to cptron parameter names (and the reverse), reads an HF
`config.json` dict into a cptron `ModelConfig` (with the defaults transformers
applies to absent keys), and builds a transformers config object from a
`ModelConfig` for export. The weight conversion itself lives in `cptron.hf`.

Supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM with SiLU
SwiGLU, rope types default/linear/llama3, GQA, tied embeddings, q/k/v bias (Qwen2).
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from cptron.errors import ConversionError
from cptron.models.config import ModelConfig

HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
FAMILY_TO_ARCH = {v: k for k, v in HF_ARCHITECTURES.items()}
_HF_CONFIG_CLASS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# Architecture fields cptron owns on export; every other key of the source config is carried over.
_OWNED_HF_KEYS = {
    "architectures",
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "sliding_window",
    "use_sliding_window",
    "hidden_act",
    "mlp_bias",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "_name_or_path",
}

_LAYER_MAP = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_LAYER_MAP_BACK = {v: k for k, v in _LAYER_MAP.items()}
_GLOBAL_MAP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_GLOBAL_MAP_BACK = {v: k for k, v in _GLOBAL_MAP.items()}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_CP_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")


def hf_to_cptron_name(name: str) -> Optional[str]:
    """cptron parameter name of an HF tensor name, or None when it has none."""
    if name in _GLOBAL_MAP:
        return _GLOBAL_MAP[name]
    m = _HF_LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_MAP:
        return f"layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{m.group(3)}"
    return None


def cptron_to_hf_name(name: str) -> str:
    if name in _GLOBAL_MAP_BACK:
        return _GLOBAL_MAP_BACK[name]
    m = _CP_LAYER_RE.match(name)
    if not m or m.group(2) not in _LAYER_MAP_BACK:
        raise ConversionError(f"parameter {name!r} has no Hugging Face name")
    return f"model.layers.{m.group(1)}.{_LAYER_MAP_BACK[m.group(2)]}.{m.group(3)}"


# ------------------------------------------------------------------------- configs


def _rope_fields(hf: dict) -> dict:
    """Rope settings from either config style: `rope_parameters` (transformers 5) or
    `rope_theta` + `rope_scaling` (transformers 4 and released checkpoints)."""
    params = hf.get("rope_parameters") or {}
    if isinstance(params, dict) and any(isinstance(v, dict) for v in params.values()):
        raise ConversionError("config.json: per-layer-type rope_parameters are not supported")
    scaling = hf.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConversionError(
            f"config.json: rope type {rope_type!r} is not supported: expected one of {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if merged.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError("config.json: partial_rotary_factor != 1 is not supported")
    out = dict(rope_theta=float(theta), rope_type=rope_type)
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(merged["factor"])
    if rope_type == "llama3":
        out.update(
            rope_low_freq_factor=float(merged["low_freq_factor"]),
            rope_high_freq_factor=float(merged["high_freq_factor"]),
            rope_original_max_position_embeddings=int(merged["original_max_position_embeddings"]),
        )
    return out


def _with_transformers_defaults(hf: dict, family: str) -> dict:
    """`hf` completed with the defaults transformers itself applies to absent keys
    (e.g. Mistral's sliding_window=4096), so cptron reads the model transformers runs."""
    import transformers  # deferred here and below: it takes seconds to import; only conversion needs it

    cls = getattr(transformers, _HF_CONFIG_CLASS[family])
    try:
        full = cls.from_dict({k: v for k, v in hf.items() if k not in ("transformers_version",)}).to_dict()
    except Exception as e:
        raise ConversionError(f"config.json: transformers rejects it as {cls.__name__}: {e}") from e
    # Keep the keys as written where present (to_dict may restyle rope settings).
    return {**full, **hf}


def json_type_name(value) -> str:
    """JSON's name for the type of a parsed value (array, null, ...), for messages about the wrong kind."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def model_config_from_hf(hf: dict, pad_vocab_to_multiple_of: int = 1) -> ModelConfig:
    """cptron ModelConfig of an HF `config.json` dict; ConversionError names what is unsupported."""
    if not isinstance(hf, dict):  # valid JSON need not be an object: [1, 2] or null would fail below
        raise ConversionError(f"config.json holds a JSON {json_type_name(hf)}: expected a JSON object")
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in HF_ARCHITECTURES:
        raise ConversionError(
            f"config.json: architecture {arch!r} is not supported: expected one of {', '.join(HF_ARCHITECTURES)}"
        )
    family = HF_ARCHITECTURES[arch]
    hf = _with_transformers_defaults(hf, family)
    try:
        return _model_config_from_full_hf(hf, family, pad_vocab_to_multiple_of)
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"config.json: missing or invalid value: {type(e).__name__}: {e}") from e


def _model_config_from_full_hf(hf: dict, family: str, pad_vocab_to_multiple_of: int) -> ModelConfig:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"config.json: hidden_act {act!r} is not supported: expected 'silu'")
    if hf.get("mlp_bias", False):
        raise ConversionError("config.json: mlp_bias=true is not supported")
    qkv_bias = family == "qwen2"
    if family != "qwen2" and hf.get("attention_bias", False):
        raise ConversionError("config.json: attention_bias=true (bias on q/k/v/o) is not supported")
    sliding = None
    if family == "mistral":
        sliding = hf.get("sliding_window")
    elif family == "qwen2" and hf.get("use_sliding_window", False):
        raise ConversionError("config.json: use_sliding_window=true (Qwen2 per-layer windows) is not supported")
    n_heads = int(hf["num_attention_heads"])
    dim = int(hf["hidden_size"])
    head_dim = hf.get("head_dim")
    cfg = ModelConfig(
        family=family,
        dim=dim,
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=None if head_dim in (None, dim // n_heads) else int(head_dim),
        ffn_hidden_dim=int(hf["intermediate_size"]),
        vocab_size=int(hf["vocab_size"]),
        pad_vocab_to_multiple_of=pad_vocab_to_multiple_of,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        sliding_window=None if sliding is None else int(sliding),
        init_std=float(hf.get("initializer_range", 0.02)),
        **_rope_fields(hf),
    )
    try:
        cfg.validate()
    except Exception as e:
        raise ConversionError(f"config.json describes an impossible model: {e}") from e
    return cfg


def hf_config_from_model_config(cfg: ModelConfig, base: Optional[dict] = None, dtype: Optional[torch.dtype] = None):
    """A transformers config object for `cfg`, keeping the non-architecture keys of `base`
    (token ids, initializer range, ...) from the model the checkpoint came from."""
    import transformers  # deferred: see _with_transformers_defaults

    cls = getattr(transformers, _HF_CONFIG_CLASS[cfg.family])
    kwargs = {k: v for k, v in (base or {}).items() if k not in _OWNED_HF_KEYS and not k.startswith("_")}
    kwargs.update(
        hidden_size=cfg.dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_size,
        intermediate_size=cfg.ffn_hidden_dim,
        vocab_size=cfg.vocab_size,
        rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu",
        rope_theta=cfg.rope_theta,
    )
    if cfg.rope_type == "linear":
        kwargs["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_factor}
    elif cfg.rope_type == "llama3":
        kwargs["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_position_embeddings,
        }
    if cfg.family == "llama":
        kwargs.update(attention_bias=False, mlp_bias=False)
    elif cfg.family == "mistral":
        kwargs["sliding_window"] = cfg.sliding_window
    elif cfg.sliding_window is not None:
        raise ConversionError("model.sliding_window is set but Qwen2 export supports full attention only")
    else:
        kwargs["use_sliding_window"] = False
    hf_cfg = cls(**kwargs)
    hf_cfg.architectures = [FAMILY_TO_ARCH[cfg.family]]
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        setattr(hf_cfg, "dtype" if hasattr(hf_cfg, "dtype") else "torch_dtype", name)
    return hf_cfg
