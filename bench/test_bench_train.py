"""pytest-benchmark, CPU-sized: one training step of tiny-qwen2 on packed poems, ours vs transformers
padded (same examples), and the packer itself.   pytest bench/ --benchmark-columns=median,iqr,rounds"""
import pytest
import torch

from bench.throughput import build_ours, build_theirs, hf_config_dict, padded, poem_examples
from engine.optim import AdamW, parameter_groups
from engine.packing import pack
from engine.train import train_step

BUDGET = 256
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    raw = hf_config_dict("tiny-qwen2")
    examples = poem_examples(raw["vocab_size"])
    return raw, examples, pack(examples, BUDGET, seed=0, epoch=0)[:4]


def test_train_step_ours(benchmark, data):
    raw, _, batches = data
    model = build_ours(raw, CPU, torch.float32)
    opt = AdamW(parameter_groups(model, 0.01), lr=1e-5)
    it = iter(range(10**6))
    benchmark.pedantic(lambda: train_step(model, opt, [batches[next(it) % 4]], BUDGET, CPU, None, 1.0),
                       rounds=3, warmup_rounds=1)
    benchmark.extra_info["tokens"] = batches[0].num_tokens


def test_train_step_transformers_padded(benchmark, data):
    raw, _, batches = data
    model = build_theirs(raw, CPU, torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    inputs = [padded(b, CPU) for b in batches]
    it = iter(range(10**6))

    def step():
        ids, mask, labels = inputs[next(it) % 4]
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)


def test_pack_2000_poems(benchmark, data):
    _, examples, _ = data
    benchmark(pack, examples, 16384, 0, 1)
