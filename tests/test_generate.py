"""Greedy generation against transformers' generate and a no-cache recompute, token for token."""
from collections import Counter

import pytest
import torch

from engine.generate import graph_batch_size, greedy_generate, plan_batches, prefill_groups
from models import KVCache, load_model
from models.base import greedy_tokens
from tests.helpers import single_thread, transformers_side

VOCAB = 320
LENGTHS = [1, 7, 23, 3, 40, 12, 64]
CAPS = [24, 5, 17, 1, 24, 9, 13]
LONGEST_SPAN = max(n + cap - 1 for n, cap in zip(LENGTHS, CAPS))      # cache rows of the longest sequence

# Random weights make a model repeat its input token; these scales make its greedy outputs vary.
FAMILIES = {
    "qwen2-gqa": (("qwen2", 4, 2, 16), {"mlp.down_proj": 4.0}),
    "bloom": (("bloom", 8, 8, 16), {"query_key_value": 3.0, "dense_4h_to_h": 4.0,
                                    "word_embeddings_layernorm.weight": 0.3}),
}


one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)   # hundreds of tiny forwards


@pytest.fixture(scope="module", params=list(FAMILIES))
def setup(request, tmp_path_factory):
    """(our model, the folder transformers wrote it to, prompts, the no-cache reference outputs)."""
    shape, scales = FAMILIES[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    transformers_side().write_random(directory, *shape, vocab=VOCAB, multiply=scales)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]
    model = load_model(directory)
    return model, directory, prompts, [recompute(model, p, cap) for p, cap in zip(prompts, CAPS)]


def recompute(model, prompt, cap):
    """No cache: rerun the whole sequence for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(cap):
            ids.append(int(model(torch.tensor(ids))[-1].argmax()))
    return ids[len(prompt):]


def test_matches_transformers_and_recompute(setup):
    model, directory, prompts, reference = setup
    assert max(len(set(r)) for r in reference) > 8, "degenerate model: outputs repeat one token"
    assert transformers_side().generate(directory, prompts, CAPS) == reference
    assert greedy_generate(model, prompts, CAPS, eos_token_ids=[]) == reference
    # prefill in several packed forwards, the longest prompt alone in its own: the same tokens
    several = max(map(len, prompts)) - 1
    assert greedy_generate(model, prompts, CAPS, eos_token_ids=[], prefill_tokens=several) == reference
    assert list(prefill_groups([[1] * 3, [1] * 2, [1] * 6, [1]], 5)) == [[[1] * 3, [1] * 2], [[1] * 6], [[1]]]


def eos_hit_by_some(reference):
    """A token that some outputs emit after their first token and others never emit."""
    counts = Counter(t for r in reference for t in set(r[1:]))
    return max((t for t, c in counts.items() if c < len(reference)), key=lambda t: counts[t])


@pytest.mark.parametrize("check_every,slots,batches", [(1, None, 1), (5, 4, 2), (16, 2, 4)])
def test_eos_cut_batches_and_stop_checks(setup, check_every, slots, batches):
    """slots: the KV budget in slots of the longest sequence (one is the scratch slot)."""
    model, directory, prompts, reference = setup
    eos = eos_hit_by_some(reference)
    expected = [r[:r.index(eos)] if eos in r else r for r in reference]
    assert any(0 < len(e) < len(r) for e, r in zip(expected, reference)) and any(e == r for e, r in zip(expected, reference))
    budget = slots and slots * LONGEST_SPAN * KVCache.bytes_per_token(model.config, model.dtype)
    stats = {}
    out = greedy_generate(model, prompts, CAPS, eos_token_ids=[eos, VOCAB + 5], kv_budget_bytes=budget,
                          check_every=check_every, stats=stats)
    assert out == expected
    assert stats["batches"] == batches
    assert stats["generated_tokens"] == sum(min(len(e) + 1, cap) for e, cap in zip(expected, CAPS))
    if check_every == 5:
        assert transformers_side().generate(directory, prompts, CAPS, eos) == expected


def test_same_cap_for_all_and_zero_cap(setup):
    model, _, prompts, reference = setup
    long_enough = [i for i, cap in enumerate(CAPS) if cap >= 4]
    assert greedy_generate(model, [prompts[i] for i in long_enough], 4, eos_token_ids=[]) == \
        [reference[i][:4] for i in long_enough]
    assert greedy_generate(model, prompts[:2], [0, 3], eos_token_ids=[]) == [[], reference[1][:3]]


def test_triton_decode_gives_the_same_tokens(setup, monkeypatch):
    """The Triton decode-attention kernel (interpreted here) in the decode steps; the other ops
    stay on their torch references, which their own tests compare with Triton. Off the interpreter
    (a GPU box) the kernel refuses CPU tensors and conftest skips the test."""
    import models.base
    from kernels import backend
    from kernels.decode_attention import decode_attention
    calls = []

    def triton_decode(*args, **kwargs):
        calls.append(1)
        with backend("triton"):
            return decode_attention(*args, **kwargs)

    monkeypatch.setattr(models.base, "decode_attention", triton_decode)
    model, _, prompts, reference = setup
    assert greedy_generate(model, prompts[:3], [8, 5, 8], eos_token_ids=[], check_every=4) == \
        [reference[0][:8], reference[1][:5], reference[2][:8]]
    assert calls


def test_plan_batches_and_buckets():
    spans = {0: 10, 1: 30, 2: 20, 3: 30}
    assert plan_batches([0, 1, 2, 3], spans, 1, 3 * 30) == [[1, 3], [2, 0]]     # (n + 1 scratch) x longest
    assert plan_batches([0, 1, 2, 3], spans, 1, 10**6) == [[1, 3, 2, 0]]
    with pytest.raises(ValueError, match="raise the budget"):
        plan_batches([1], spans, 1, 59)
    spans = {0: 10, 1: 30, 2: 10, 3: 10, 4: 10}
    assert plan_batches(list(spans), spans, 1, 90) == [[1, 0], [2, 3, 4]]
    assert plan_batches(list(spans), spans, 1, 90, one_cache=True) == [[1, 0], [2, 3], [4]]   # x 30 each
    assert [graph_batch_size(n) for n in (1, 3, 8, 9, 17, 33, 100, 2000)] == [1, 4, 8, 10, 20, 40, 112, 2048]
    assert all(n <= graph_batch_size(n) <= 1.25 * n for n in range(9, 5000))


def test_graphs_recorded_once_per_size_over_an_evaluation(setup, monkeypatch):
    """Three decode batches through the CUDA-graph path, with a stand-in recorder whose replay
    reruns the recorded step on the static buffers: each graph batch size is recorded once for
    the whole evaluation, not once per batch, and the tokens equal the eager ones; later calls
    replay the decode state kept on the model, until its weights are other tensors."""
    import engine.generate as generate
    model, _, prompts, reference = setup
    recorded, sizes_per_batch = [], []

    def stand_in_capture(run):
        recorded.append(run)
        run()                                   # the warm-up the CUDA recorder does
        return run

    def prefill_batch(*args):
        sizes_per_batch.append(set())
        return real_prefill(*args)

    def decode_step(self, tokens, positions, slots):
        sizes_per_batch[-1].add(graph_batch_size(tokens.numel()))
        assert self.capture is stand_in_capture and self.scratch == self.cache.slots - 1
        assert not set(slots.tolist()) & {self.scratch}
        return real_step(self, tokens, positions, slots)

    real_prefill, real_step = generate.prefill_batch, generate.DecodeStep.__call__
    monkeypatch.setattr(generate, "graph_recorder", lambda model: stand_in_capture)
    monkeypatch.setattr(generate, "prefill_batch", prefill_batch)
    monkeypatch.setattr(generate.DecodeStep, "__call__", decode_step)
    budget = 4 * LONGEST_SPAN * KVCache.bytes_per_token(model.config, model.dtype)   # 3 sequences a batch
    stats = {}
    assert greedy_generate(model, prompts, CAPS, eos_token_ids=[], kv_budget_bytes=budget, check_every=1,
                           stats=stats) == reference
    used = set().union(*sizes_per_batch)
    assert stats["batches"] == len(sizes_per_batch) == 3
    assert stats["graph_captures"] == len(recorded) == len(used) == 3
    assert sum(map(len, sizes_per_batch)) == 6           # recording per batch would have taken 6
    kept = model.decode_state
    # a later evaluation (the next one of a training run) replays the kept graphs: nothing recorded
    again = {}
    assert greedy_generate(model, prompts, CAPS, eos_token_ids=[], kv_budget_bytes=budget, check_every=1,
                           stats=again) == reference
    assert again["graph_captures"] == 0 and len(recorded) == 3 and model.decode_state is kept
    # a smaller evaluation fits the kept cache: still nothing recorded
    assert greedy_generate(model, prompts[:2], CAPS[:2], eos_token_ids=[], kv_budget_bytes=budget,
                           stats=again) == reference[:2]
    assert again["graph_captures"] == 0 and model.decode_state is kept
    # new weight tensors (graphs read the old addresses): the state is rebuilt and its graphs recorded anew
    first = next(model.parameters())
    first.data = first.data.clone()
    assert greedy_generate(model, prompts, CAPS, eos_token_ids=[], kv_budget_bytes=budget, check_every=1,
                           stats=again) == reference
    assert again["graph_captures"] == 3 and model.decode_state is not kept
    # a state larger than the bound is not kept; release_decode_state frees a kept one
    monkeypatch.setattr(generate, "CPU_KV_BUDGET", model.decode_state.nbytes - 1)
    greedy_generate(model, prompts[:1], CAPS[:1], eos_token_ids=[], kv_budget_bytes=budget)
    assert model.decode_state is None
    monkeypatch.setattr(generate, "CPU_KV_BUDGET", 1 << 30)
    greedy_generate(model, prompts[:1], CAPS[:1], eos_token_ids=[], kv_budget_bytes=budget)
    assert model.decode_state is not None
    generate.release_decode_state(model)
    assert model.decode_state is None
    monkeypatch.undo()
    eager = {}
    assert greedy_generate(model, prompts, CAPS, eos_token_ids=[], kv_budget_bytes=budget, cuda_graphs=False,
                           stats=eager) == reference
    assert eager["graph_captures"] == 0 and eager["batches"] == 2


@pytest.mark.parametrize("case", ["ties", "nan"])
def test_greedy_tokens_are_the_fp32_argmax_across_tiles(case):
    """Integer-valued inputs make every fp32 logit exact, so ties are exact whatever the GEMM's
    summation order: ties within and across row and column tiles go to the first index, as in
    torch.argmax, and so does a NaN."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randint(-2, 3, (37, 24), generator=g).float()
    weight = torch.randint(-2, 3, (2500, 24), generator=g).float()
    winners = {}
    for k in range(0, 37, 2):                  # row k's best logit, 3|h_k|_1, at 2 or 3 columns
        copies = [1000 + k, 2048 + k] + ([10 + k] if k % 4 == 0 else [])
        weight[copies] = 3 * hidden[k].sign()
        winners[k] = min(copies)
    if case == "nan":
        weight[1500, 3] = float("nan")
    tile = 4 * 1024 * 8                        # 1,024 columns x 8 rows per tile: 3 x 5 tiles
    want = (hidden.double() @ weight.double().t()).float().argmax(-1)
    if case == "nan":
        assert (want == 1500).all()
    else:
        assert all(want[k] == column for k, column in winners.items())
    assert torch.equal(greedy_tokens(hidden, weight, tile_bytes=tile), want)
    assert torch.equal(greedy_tokens(hidden.bfloat16(), weight.bfloat16(), tile_bytes=tile), want)
    assert torch.equal(greedy_tokens(hidden, weight), want)


def near_tie_rows(model, hiddens, low, high, i, j):
    """Output rows `low` = s e_i and `high` = s e_i + g e_j (all others 0), so that at every hidden
    state the fp32 logit of `high` exceeds that of `low` by less than bf16 keeps apart."""
    weight = model.lm_head.weight
    for s in torch.linspace(28, 32, 400) / min(h[i].float() for h in hiddens):
        for g in (0.01, 0.02, 0.04):
            weight.zero_()
            weight[low, i] = weight[high, i] = s
            weight[high, j] = g / max(h[j].float() for h in hiddens)
            fp32 = [h.float() @ weight.float().t() for h in hiddens]
            if all(int(z.argmax()) == high and int(model.logits(h).argmax()) == low for z, h in zip(fp32, hiddens)):
                return
    raise AssertionError("no near-tie found")


def test_bf16_near_tie_is_decided_in_fp32(tmp_path):
    """A bf16 model whose top two logits round to the same bf16 value at both the prefill's and
    the decode step's decision: the greedy pick is the fp32 argmax, where bf16's is the other."""
    transformers_side().write_random(tmp_path, "qwen2", 4, 2, 16, tied=False)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    prompt, low, high = [5, 17, 3, 250], 7, 11
    with torch.no_grad():
        cache = KVCache(model.config, 2, 8, dtype=torch.bfloat16)
        slot = torch.tensor([0])
        cu = torch.tensor([0, len(prompt)], dtype=torch.int32)
        h1 = model.prefill(torch.tensor(prompt), cu, cache, slot, return_hidden=True)[-1]
        h2 = model.decode_step(torch.tensor([high]), torch.tensor([len(prompt)]), cache, slot, return_hidden=True)[0]
        both = torch.minimum(h1, h2).float()
        i, j = both.topk(2).indices.tolist()
        assert both[j] > 0
        near_tie_rows(model, [h1, h2], low, high, i, j)
    assert greedy_generate(model, [prompt], 2, eos_token_ids=[]) == [[high, high]]
