"""What several test files share: transformers' side of the parity tests, small models and inputs."""
from __future__ import annotations

import functools

import torch

from bench.transformers_side import TransformersSide
from kernels.attention import cu_seqlens


@functools.cache
def transformers_side() -> TransformersSide:
    """This test process's transformers worker (bench/transformers_side.py: transformers never runs in our
    process, whose `kernels` is not Hugging Face's), one thread, started on its first use."""
    return TransformersSide(threads=1)


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
