"""pytest-benchmark, CPU-sized: greedy decoding of tiny-qwen2, ours (KV cache, packed prefill) vs
transformers' generate on the left-padded prompts. 8 prompts x 16 new tokens."""
import pytest
import torch

from bench.throughput import Settings, build_ours, build_theirs, eval_ours, eval_theirs, hf_config_dict, poem_examples
from engine.generate import greedy_generate

CPU = torch.device("cpu")
PROMPTS, NEW = 8, 16


@pytest.fixture(scope="module")
def setup():
    raw = hf_config_dict("tiny-qwen2")
    prompts = [list(e.prompt_ids) for e in poem_examples(raw["vocab_size"])[:PROMPTS]]
    return raw, prompts


def test_generate_ours(benchmark, setup):
    raw, prompts = setup
    model = build_ours(raw, CPU, torch.float32)
    benchmark.pedantic(lambda: greedy_generate(model, prompts, NEW, eos_token_ids=[]), rounds=3, warmup_rounds=1)


def test_generate_transformers(benchmark, setup):
    raw, prompts = setup
    model = build_theirs(raw, CPU, torch.float32)
    s = Settings(0, 0, 0, 0, PROMPTS, NEW, 1)
    benchmark.pedantic(lambda: eval_theirs(model, prompts, s, CPU), rounds=3, warmup_rounds=1)


def test_eval_ours_reports_tokens(setup):
    """The throughput helper counts every requested token (no EOS: random weights never stop)."""
    raw, prompts = setup
    r = eval_ours(build_ours(raw, CPU, torch.float32), prompts[:2], Settings(0, 0, 0, 0, 2, 4, 1), CPU)
    assert r["tokens_per_second"] > 0
