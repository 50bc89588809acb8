"""Short model names, and where a model's files are found.

Resolution order for a name: a local directory; the Hugging Face cache
(HF_HOME / HF_HUB_CACHE, models--ORG--NAME/snapshots/*); a huggingface_hub download when the
network allows. The tiny presets need no files: random weights from a built-in config and
the tokenizer shipped in models/assets/tiny-tokenizer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
TINY_TOKENIZER = ASSETS / "tiny-tokenizer"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    repo: str | None                  # Hugging Face repository, None for built-in presets
    chat: bool = False                # instruct/chat checkpoints get the chat template by default
    # The architecture keys of the repository's config.json, so that benchmarks, profiles and
    # random-weight models need no download; a checkpoint's own config.json always wins.
    config: dict = field(default_factory=dict, hash=False)


def _tiny(model_type: str, **extra) -> dict:
    return {"model_type": model_type, "vocab_size": 4096, "hidden_size": 256, "num_hidden_layers": 4,
            "num_attention_heads": 4, "torch_dtype": "float32", "bos_token_id": 0, "eos_token_id": 0,
            "tie_word_embeddings": True, **extra}


def _tiny_qwen2(hidden: int, layers: int) -> dict:
    return _tiny("qwen2", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 16,
                 num_key_value_heads=max(1, hidden // 32), intermediate_size=3 * hidden, rms_norm_eps=1e-6,
                 rope_theta=10000.0, max_position_embeddings=1024)


def _qwen2(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, tied: bool = True,
           vocab: int = 151936) -> dict:
    return {"model_type": "qwen2", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "tie_word_embeddings": tied, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16",
            "max_position_embeddings": 32768}


def _bloom(hidden: int, vocab: int = 250880, layers: int = 24, heads: int = 16) -> dict:
    return {"model_type": "bloom", "vocab_size": vocab, "hidden_size": hidden, "n_layer": layers, "n_head": heads,
            "layer_norm_epsilon": 1e-5, "torch_dtype": "float16"}


REGISTRY = {spec.name: spec for spec in [
    ModelSpec("qwen1.5-0.5b", "Qwen/Qwen1.5-0.5B-Chat", True, _qwen2(1024, 2816, 24, 16, 16)),
    ModelSpec("qwen2-0.5b", "Qwen/Qwen2-0.5B-Instruct", True, _qwen2(896, 4864, 24, 14, 2)),
    ModelSpec("qwen2-1.5b", "Qwen/Qwen2-1.5B-Instruct", True, _qwen2(1536, 8960, 28, 12, 2)),
    ModelSpec("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B-Instruct", True, _qwen2(896, 4864, 24, 14, 2)),
    ModelSpec("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B-Instruct", True, _qwen2(1536, 8960, 28, 12, 2)),
    # beyond the paper, for several GPUs (FSDP2): what a rank holds, and how many ranks a card needs
    ModelSpec("qwen2.5-3b", "Qwen/Qwen2.5-3B-Instruct", True, _qwen2(2048, 11008, 36, 16, 2)),
    ModelSpec("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", True, _qwen2(3584, 18944, 28, 28, 4, tied=False, vocab=152064)),
    ModelSpec("bloom-389m-zh", "Langboat/bloom-389m-zh", config=_bloom(1024, vocab=42437)),
    ModelSpec("bloom-1b4-zh", "Langboat/bloom-1b4-zh", config=_bloom(2048, vocab=46145)),
    ModelSpec("bloom-560m", "bigscience/bloom-560m", config=_bloom(1024)),
    ModelSpec("bloom-1b7", "bigscience/bloom-1b7", config=_bloom(2048)),
    ModelSpec("tiny-qwen2", None, config=_tiny(
        "qwen2", intermediate_size=688, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=1024)),
    ModelSpec("tiny-bloom", None, config=_tiny("bloom", layer_norm_epsilon=1e-5)),
    # The capacity curve on a CPU (engine/capacity.py): three widths of tiny-qwen2, 0.16M, 0.36M and 1.3M parameters.
    *[ModelSpec(f"tiny-qwen2-{size}", None, config=_tiny_qwen2(hidden, layers)) for size, hidden, layers in
      [("160k", 32, 2), ("360k", 64, 2), ("1.3m", 128, 4)]],
]}

PAPER_MODELS = ["qwen1.5-0.5b", "qwen2-0.5b", "qwen2-1.5b", "bloom-389m-zh", "bloom-1b4-zh", "bloom-560m", "bloom-1b7"]


def _hub_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    dirs.append(hf_home / "hub")
    return dirs


def cached_snapshot(repo: str) -> Path | None:
    """The newest snapshot of `repo` in the local Hugging Face cache that holds a config.json."""
    folder = "models--" + repo.replace("/", "--")
    for cache in _hub_cache_dirs():
        snapshots = sorted((cache / folder / "snapshots").glob("*/config.json"), key=lambda p: p.stat().st_mtime)
        if snapshots:
            return snapshots[-1].parent
    return None


def _download(repo: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt"]))
    except Exception as e:
        raise FileNotFoundError(
            f"the weights of {repo} are not in the Hugging Face cache and could not be downloaded "
            f"({type(e).__name__}).\n"
            f"  online:  hf download {repo}   (huggingface_hub >= 0.34; older: huggingface-cli download {repo})\n"
            f"  offline: copy the repository's files (config.json, *.safetensors or pytorch_model.bin, tokenizer.json) "
            f"to a folder and pass that folder instead of the name") from None


def resolve(name_or_path) -> tuple[Path | None, ModelSpec | None]:
    """(directory holding config.json or None for built-in presets, registry entry or None)."""
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: point at a Hugging Face model folder")
        return path, None
    spec = REGISTRY.get(str(name_or_path))
    if spec is None:
        known = ", ".join(REGISTRY)
        raise ValueError(f"unknown model {name_or_path!r}: not a folder and not one of the short names ({known})")
    if spec.repo is None:
        return None, spec
    return cached_snapshot(spec.repo) or _download(spec.repo), spec
