"""Bits memorized: per-poem scores against transformers in float64, and what training does to them."""
import math
import random

import pytest
import torch

from engine.data import Example, encode_examples, load_poems
from engine.packing import pack
from engine.scoring import bits_summary, poem_bits
from models import load_model, load_tokenizer
from tests.helpers import tiny_checkpoint, transformers_side

VOCAB = 320


def random_examples(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    return [Example(tuple(rng.randrange(VOCAB) for _ in range(rng.randint(1, 9))),
                    tuple(rng.randrange(VOCAB) for _ in range(rng.randint(1, 23)))) for _ in range(n)]


def reference_bits(logits, example: Example) -> float:
    """-log2 p(target | prompt) from transformers' float64 logits of the lone sequence."""
    logprobs = logits.log_softmax(-1)
    first = len(example.prompt_ids)
    picked = logprobs[first - 1:-1].gather(1, torch.tensor(example.target_ids)[:, None])
    return -picked.sum().item() / math.log(2)


@pytest.mark.parametrize("family", ["qwen2", "bloom"])
def test_per_poem_bits_match_transformers_in_float64(tmp_path, family, one_thread):
    transformers_side().write_random(tmp_path, family, heads=4, kv_heads=2, head_dim=16, vocab=VOCAB)
    model = load_model(tmp_path)
    examples = random_examples(13, seed=len(family))
    logits = transformers_side().logits(tmp_path, [list(e.input_ids) for e in examples], dtype=torch.float64)
    want = [reference_bits(z, e) for z, e in zip(logits, examples)]
    for batch_tokens in (40, 4096):            # several packed batches, then one
        got = poem_bits(model, examples, batch_tokens)
        assert len(got) == len(examples)
        for g, w in zip(got, want):
            assert abs(g - w) <= 1e-5 * w, (batch_tokens, g, w)


def test_bits_gained_is_positive_after_training_and_at_most_the_base_information(tmp_path, one_thread):
    tokenizer = load_tokenizer("tiny-qwen2")
    model = load_model(tiny_checkpoint(tmp_path / "model", hidden=64))
    poems = load_poems("cn", 256, 4, seed=3)
    examples = encode_examples(poems, tokenizer, "cn", "plain")
    base = poem_bits(model, examples)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for epoch in range(6):
        for batch in pack(examples, 256, seed=0, epoch=epoch):
            model.loss(batch.input_ids, batch.shifted_labels(), batch.cu_seqlens, batch.position_ids,
                       batch.max_seqlen).backward()
            opt.step()
            opt.zero_grad()
    trained = poem_bits(model, examples)
    assert model.training                       # scoring leaves the mode as it found it
    assert all(t > 0 for t in trained) and all(t < b for t, b in zip(trained, base)), (base, trained)
    summary = bits_summary(base, trained, model.num_parameters(), memorized=2)
    assert 0 < summary["bits_gained"] <= summary["base_bits"]
    assert summary["bits_gained"] == pytest.approx(sum(base) - sum(trained))


def test_bits_summary_divides_by_parameters_and_memorized_poems():
    summary = bits_summary([100.0, 60.0], [10.0, 50.0], parameters=50, memorized=2)
    assert summary == {"base_bits": 160.0, "trained_bits": 60.0, "bits_gained": 100.0, "bits_gained_share": 0.625,
                       "bits_per_parameter": 2.0, "bits_per_memorized_poem": 50.0}
    assert bits_summary([1.0], [0.5], parameters=10, memorized=0)["bits_per_memorized_poem"] is None
    with pytest.raises(ValueError, match="same poems"):
        bits_summary([1.0, 2.0], [1.0], parameters=10, memorized=0)
