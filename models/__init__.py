"""Model definitions (Qwen2 family, BLOOM), configs, the registry and checkpoint I/O.

    model = load_model("qwen2-0.5b" | "/path/to/hf/dir", device="cpu", dtype=torch.float32)
    tok = load_tokenizer("qwen2-0.5b" | "/path/to/hf/dir")
    logits = model(input_ids, cu_seqlens=cu)          # [T] int64, [B+1] int32 -> [T, V]
"""
from __future__ import annotations

import torch

from models.base import CausalLM, KVCache, init_weights
from models.bloom import BloomForCausalLM
from models.config import ModelConfig
from models.qwen2 import Qwen2ForCausalLM
from models.registry import PAPER_MODELS, REGISTRY, TINY_TOKENIZER, resolve
from models.tokenizer import Tokenizer, read_tokenizer_dir
from models.weights import CheckpointError, load_weights


def model_class(config: ModelConfig) -> type[CausalLM]:
    return {"qwen2": Qwen2ForCausalLM, "bloom": BloomForCausalLM}[config.model_type]


def empty_model(config: ModelConfig, device, dtype, shard=None) -> CausalLM:
    """The model allocated once on `device` in `dtype` (bf16 on GPUs, fp32 on the CPU when None),
    its values not yet set: built on the meta device, where .to(dtype) allocates nothing, and
    sharded there by `shard` if given, so that only this rank's shards are allocated."""
    with torch.device("meta"):
        model = model_class(config)(config)
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    model = model.to(dtype)
    return (shard(model) if shard else model).to_empty(device=device)


def build_model(config: ModelConfig, device="cpu", dtype=None, seed: int | None = None) -> CausalLM:
    """A randomly initialized model (transformers' init): tiny presets, benchmarks."""
    model = empty_model(config, device, dtype)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        init_weights(model)
    return model


def load_model(name_or_path, device="cpu", dtype=None, random_init: bool = False, seed: int = 0,
               shard=None) -> CausalLM:
    """A model from a folder, a registry name (local cache, then the hub) or a tiny preset.
    `random_init` builds the registry's shape with random weights instead (needs no download).
    `shard` (engine.distributed's FSDP2 over several ranks) takes the model and returns it sharded:
    a checkpoint's model is sharded before its weights are read, and each rank reads only its rows;
    a random one is built whole and then sharded, its values those of one process."""
    directory, spec = (None, REGISTRY[name_or_path]) if random_init else resolve(name_or_path)
    if directory is None:
        model = build_model(ModelConfig.from_dict(spec.config, f"preset {spec.name}"), device, dtype, seed)
        model = shard(model) if shard else model
        model.source_dir = TINY_TOKENIZER if spec.repo is None else None
        return model
    model = empty_model(ModelConfig.from_file(directory / "config.json"), device, dtype, shard)
    load_weights(model, directory)
    model.source_dir = directory
    return model


def load_tokenizer(name_or_path) -> Tokenizer:
    """The tokenizer of a model folder, a registry name, or the shipped tiny tokenizer for presets."""
    directory, _ = resolve(name_or_path)
    return read_tokenizer_dir(directory if directory is not None else TINY_TOKENIZER)


__all__ = ["PAPER_MODELS", "REGISTRY", "CausalLM", "CheckpointError", "KVCache", "ModelConfig", "Tokenizer",
           "build_model", "load_model", "load_tokenizer", "resolve"]
