import math
import random

import pytest
import torch

from engine.data import IGNORE, Example, encode_examples, load_poems
from engine.packing import collate, pack, packing_efficiency
from models import load_tokenizer


def synthetic(n=300, seed=0, max_len=90):
    """Examples whose tokens name the example and position, so every token can be traced back."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        prompt, target = rng.randint(1, 20), rng.randint(1, max_len - 20)
        ids = [i * 1000 + j for j in range(prompt + target)]
        examples.append(Example(tuple(ids[:prompt]), tuple(ids[prompt:])))
    return examples


def sequences(batch):
    cu = batch.cu_seqlens.tolist()
    return [(batch.input_ids[a:b].tolist(), batch.labels[a:b].tolist(), batch.position_ids[a:b].tolist())
            for a, b in zip(cu, cu[1:])]


@pytest.mark.parametrize("budget", [90, 256, 1000])
def test_pack_invariants(budget):
    examples = synthetic()
    batches = pack(examples, budget, seed=0, epoch=0)
    seen = []
    for batch in batches:
        assert batch.input_ids.dtype == batch.position_ids.dtype == batch.labels.dtype == torch.int64
        assert batch.cu_seqlens.dtype == torch.int32 and isinstance(batch.max_seqlen, int)
        t = batch.num_tokens
        assert 0 < t <= budget and batch.position_ids.shape == batch.labels.shape == (t,)
        assert batch.cu_seqlens[0] == 0 and batch.cu_seqlens[-1] == t
        lengths = batch.cu_seqlens.diff().tolist()
        assert min(lengths) > 0 and batch.max_seqlen == max(lengths)
        for ids, labels, positions in sequences(batch):
            example = examples[ids[0] // 1000]
            assert ids == example.input_ids and labels == example.labels
            assert positions == list(range(len(ids)))
            seen.append(ids[0] // 1000)
        assert batch.num_target_tokens == int((batch.labels != IGNORE).sum())
    assert sorted(seen) == list(range(len(examples)))       # every example exactly once, so every token once
    assert sum(b.num_target_tokens for b in batches) == sum(len(e.target_ids) for e in examples)


def test_shifted_labels_stay_inside_each_sequence():
    batch = pack(synthetic(40), 400, seed=1, epoch=0)[0]
    shifted = batch.shifted_labels()
    ends = set((batch.cu_seqlens[1:] - 1).tolist())
    for t in range(batch.num_tokens):
        assert shifted[t] == (IGNORE if t in ends else batch.labels[t + 1])


def test_target_rows_are_the_positions_that_predict_a_target():
    batch = collate([Example((5, 6, 7), (8, 9)), Example((1,), (2, 3, 4)), Example((0,), ())])
    # rows 2, 3 predict 8, 9; row 5, 6, 7 predict 2, 3, 4; the last sequence (an idle one) predicts nothing
    assert batch.target_rows.tolist() == [2, 3, 5, 6, 7] == batch.prediction_rows().tolist()
    assert len(batch.target_rows) == batch.num_target_tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_loss_on_the_target_rows_equals_the_loss_on_every_row(dtype):
    from tests.helpers import rel_err, tiny_model
    rng = random.Random(3)
    examples = [Example(tuple(rng.randrange(4096) for _ in range(rng.randint(5, 20))),
                        tuple(rng.randrange(4096) for _ in range(rng.randint(10, 40)))) for _ in range(12)]
    batch = collate(examples)
    results = []
    for rows in (None, batch.target_rows):
        model = tiny_model(dtype=dtype)
        loss = model.loss(batch.input_ids, batch.shifted_labels(), batch.cu_seqlens, batch.position_ids,
                          batch.max_seqlen, reduction="sum", target_rows=rows)
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])))
    (loss, grads), (selected_loss, selected_grads) = results
    assert len(batch.target_rows) < 0.8 * batch.num_tokens          # the prompts' rows are left out
    # the same sums in another order (the loss's logits are fp32 for either dtype): measured 0 and ~1.4e-7
    assert rel_err(selected_loss, loss) < 1e-6 and rel_err(selected_grads, grads) < 1e-5


def test_pack_is_a_pure_function_of_seed_and_epoch():
    examples = synthetic()

    def stream(seed, epoch):
        return [b.input_ids.tolist() for b in pack(examples, 512, seed=seed, epoch=epoch)]

    assert stream(0, 3) == stream(0, 3)
    assert stream(0, 3) != stream(0, 4)
    assert stream(0, 3) != stream(1, 3)
    first_batch = {tuple(sorted(s[0][0] // 1000 for s in sequences(b))) for b in pack(examples, 512, 0, 0)}
    other_epoch = {tuple(sorted(s[0][0] // 1000 for s in sequences(b))) for b in pack(examples, 512, 0, 1)}
    assert first_batch != other_epoch                          # batch composition changes between epochs


def test_example_longer_than_budget():
    with pytest.raises(ValueError, match="longer than the 50-token budget.*raise the token budget"):
        pack(synthetic(), 50)


def test_to_device_moves_every_tensor():
    """To the GPU when there is one (values compared back on the host), else to the meta device
    (no values, so devices, shapes and dtypes)."""
    batch = pack(synthetic(10), 1000)[0]
    device = torch.device("cuda" if torch.cuda.is_available() else "meta")
    moved = batch.to(device)
    assert moved.max_seqlen == batch.max_seqlen
    for name in ("input_ids", "position_ids", "cu_seqlens", "labels", "target_rows"):
        here, there = getattr(batch, name), getattr(moved, name)
        assert there.device.type == device.type and there.shape == here.shape and there.dtype == here.dtype, name
        if device.type == "cuda":
            assert torch.equal(there.cpu(), here), name


def test_packing_efficiency_of_a_hand_packed_case():
    examples = [Example((1,) * 10, (2,) * n) for n in (50, 30, 40)]       # 60 + 40 tokens, then 50
    batches = pack(examples, 100)
    assert sorted(batch.num_tokens for batch in batches) == [50, 100]
    assert packing_efficiency(batches, 100) == 0.75                      # 150 tokens in 2 x 100


@pytest.mark.parametrize("length,fmt", [(256, "plain"), (256, "chat"), (512, "plain")])
def test_best_fit_reaches_the_minimum_batch_count(length, fmt):
    tok = load_tokenizer("tiny-qwen2")
    examples = encode_examples(load_poems("cn", length), tok, "cn", fmt)
    budget = 16384
    batches = pack(examples, budget, seed=0, epoch=0)
    total = sum(len(e) for e in examples)
    assert len(batches) == math.ceil(total / budget)
    if fmt == "chat":
        assert packing_efficiency(batches, budget) > 0.98
