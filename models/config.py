"""The model configuration, read from a Hugging Face config.json.

One dataclass for both families. Hugging Face key aliases are accepted (n_embed/hidden_size,
n_head/num_attention_heads, n_layer/num_hidden_layers, torch_dtype/dtype, rope_theta or
rope_parameters.rope_theta) and missing keys take transformers' defaults. The dict as read is
kept in `raw` and written back by save_pretrained, so a saved folder loads in transformers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

FAMILIES = ("qwen2", "bloom")

# transformers' defaults (Qwen2Config, BloomConfig) for keys a config.json may omit
_DEFAULTS = {
    "qwen2": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False},
    "bloom": {"vocab_size": 250880, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
              "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True},
}
_ALIASES = {"n_embed": "hidden_size", "n_head": "num_attention_heads", "n_layer": "num_hidden_layers",
            "torch_dtype": "dtype"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    tie_word_embeddings: bool
    rope_theta: float = 10000.0                       # qwen2
    residual_post_layernorm: bool = False             # bloom
    dtype: torch.dtype = torch.float32                # the checkpoint's dtype
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "ModelConfig":
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(f"{source}: model_type {model_type!r} is not supported; the engine runs "
                             f"{' and '.join(FAMILIES)} models (Qwen1.5/Qwen2/Qwen2.5 are 'qwen2')")
        c = dict(_DEFAULTS[model_type])
        for key, value in raw.items():
            c[_ALIASES.get(key, key)] = value
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"{source}: rope scaling {rope!r} is not supported; only plain RoPE")
        try:
            heads = _positive_int(c, "num_attention_heads", source)
            hidden = _positive_int(c, "hidden_size", source)
            kv_heads = int(c.get("num_key_value_heads") or heads)
            head_dim = int(c.get("head_dim") or hidden // heads)
            config = cls(
                model_type=model_type,
                vocab_size=_positive_int(c, "vocab_size", source),
                hidden_size=hidden,
                num_layers=_positive_int(c, "num_hidden_layers", source),
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                intermediate_size=int(c.get("intermediate_size") or 4 * hidden),
                norm_eps=float(c["rms_norm_eps"] if model_type == "qwen2" else c["layer_norm_epsilon"]),
                tie_word_embeddings=bool(c["tie_word_embeddings"]),
                rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
                residual_post_layernorm=bool(c.get("apply_residual_connection_post_layernorm", False)),
                dtype=_DTYPES.get(str(c.get("dtype") or "float32").replace("torch.", ""), torch.float32),
                raw=dict(raw),
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: malformed value ({e})") from None
        if heads % kv_heads or (model_type == "qwen2" and head_dim % 2):
            raise ValueError(f"{source}: {heads} attention heads cannot be grouped over {kv_heads} key/value heads "
                             f"with head_dim {head_dim}")
        if model_type == "bloom" and head_dim * heads != hidden:
            raise ValueError(f"{source}: hidden_size {hidden} is not divisible by n_head {heads}")
        return config

    @classmethod
    def from_file(cls, path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} not found: a model folder needs its config.json") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); download it again") from None
        return cls.from_dict(raw, str(path))

    def to_dict(self, dtype: torch.dtype) -> dict:
        """The Hugging Face config.json to write beside weights saved in `dtype`."""
        raw = {k: v for k, v in self.raw.items() if k != "torch_dtype"}
        name = next(k for k, v in _DTYPES.items() if v == dtype)
        architectures = {"qwen2": "Qwen2ForCausalLM", "bloom": "BloomForCausalLM"}[self.model_type]
        return {**raw, "architectures": [architectures], "dtype": name, "torch_dtype": name}


def _positive_int(c: dict, key: str, source: str) -> int:
    value = c.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value
