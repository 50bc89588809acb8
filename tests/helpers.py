"""Random Hugging Face checkpoints written by transformers itself, for parity tests."""
from __future__ import annotations

import torch

from kernels.attention import cu_seqlens


def hf_config(family: str, heads: int, kv_heads: int, head_dim: int, layers: int = 2, vocab: int = 320,
              tied: bool = True, **extra):
    import transformers
    if family == "qwen2":
        return transformers.Qwen2Config(
            vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=3 * head_dim, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied, rope_theta=10000.0,
            max_position_embeddings=4096, eos_token_id=0, bos_token_id=0, pad_token_id=0, **extra)
    return transformers.BloomConfig(vocab_size=vocab, hidden_size=heads * head_dim, n_layer=layers, n_head=heads,
                                    eos_token_id=0, bos_token_id=0, pad_token_id=0, **extra)


def hf_model(config, seed: int = 0, scale: float = 0.1):
    """A transformers model with every parameter random, in fp32, eager attention: matrices with
    std 1/sqrt(fan_in) (embeddings too) so activations and logits stay O(1) as in a trained model, norm weights around 1."""
    import transformers
    torch.manual_seed(seed)
    cls = transformers.Qwen2ForCausalLM if config.model_type == "qwen2" else transformers.BloomForCausalLM
    model = cls._from_config(config, attn_implementation="eager", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_f" in name:
                p.copy_(1 + scale * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0, scale)
            elif p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5)
            else:
                p.normal_(0, scale)
    return model


def save_hf(config, directory, seed: int = 0, **save_kwargs):
    model = hf_model(config, seed)
    model.save_pretrained(directory, **save_kwargs)
    return model


def packed(lengths, vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sum(lengths),), generator=g)
    return ids, cu_seqlens(lengths)


def tiny_checkpoint(directory, family: str = "qwen2", hidden: int = 64, layers: int = 2, seed: int = 0):
    """A small random model folder with the shipped tiny tokenizer: trains in seconds on a CPU."""
    from models import build_model, load_tokenizer
    from models.config import ModelConfig
    from models.registry import REGISTRY
    preset = REGISTRY["tiny-qwen2" if family == "qwen2" else "tiny-bloom"].config
    config = ModelConfig.from_dict({**preset, "hidden_size": hidden, "num_hidden_layers": layers,
                                    "intermediate_size": 2 * hidden})
    build_model(config, seed=seed).save_pretrained(directory, load_tokenizer("tiny-qwen2"))
    return directory


def rel_err(got, want) -> float:
    """Relative norm error of `got` against the reference `want`, computed in float64."""
    want = want.double()
    return ((got.double() - want).norm() / want.norm().clamp(min=1e-30)).item()


def single_thread():
    """The body of the `one_thread` fixtures (conftest's, and test_generate's for a whole module):
    tiny models' matmuls are too small for threads, on 2 shared cores they mostly wait on each
    other (tiny decode loops run up to 10x slower with two OpenMP threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(dtype=torch.float32, seed: int = 0):
    """The model tiny_checkpoint() saves (64 hidden, 2 layers, 2 KV heads, tiny-qwen2's vocabulary), in memory."""
    from models import build_model
    from models.config import ModelConfig
    from models.registry import REGISTRY
    config = {**REGISTRY["tiny-qwen2"].config, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128}
    return build_model(ModelConfig.from_dict(config), dtype=dtype, seed=seed)
