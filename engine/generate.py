"""KV-cached batched greedy generation: the evaluator's decoder.

    new_ids = greedy_generate(model, prompts, max_new_tokens=200, eos_token_ids=[eos])

No padding anywhere, and no host sync per token (gpt-fast / nano-vllm style):
  1. plan: sequences, longest first (prompt + cap), are grouped into batches whose KV cache
     ([n + 1 slots, longest prompt + cap] per layer) fits `kv_budget_bytes` (with CUDA graphs
     one cache serves every batch, so each is sized by the longest span of all);
  2. prefill: the batch's prompts as one packed varlen stream (cu_seqlens) write their keys and
     values into cache slots 0..n-1; only each prompt's last hidden state reaches the output
     layer, so [T, V] logits never exist;
  3. decode: one token per live sequence per step, its argmax over fp32 logits on the device
     (models.base.greedy_tokens: bf16 logits would tie near-ties). A device-side `done`
     mask (EOS or the sequence's own cap) is read by the host only every `check_every` steps;
     finished sequences then leave the batch: the live tensors are compacted, the cache does
     not move because every live sequence carries its slot id. A sequence that finished between
     two checks keeps decoding in place (its position frozen); those tokens are cut away.
  4. on CUDA the decode step (forward + argmax) is a CUDA graph per bucketed batch size, recorded
     on first use and replayed every step of every batch (DecodeStep). The decode state (its KV
     cache, static buffers and graphs) is kept on the model for the next call, so the evaluations
     of a training run record each graph batch size once per process: a later call reuses it when
     its cache holds the new plan and the model's weights are still the tensors the graphs read
     (the optimizer updates them in place); otherwise it is freed first and a new one is built.
     What stays alive between calls: that KV cache (slots x longest span x
     KVCache.bytes_per_token), kept only if it is at most KEEP_SHARE of the GPU's memory, and the
     graphs' private pool (one decode step's activations at the largest batch size and its argmax
     logits tile, <= ARGMAX_TILE_BYTES); `release_decode_state(model)` frees them at once.
     Everything else is the same code on every device.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from kernels.attention import cu_seqlens as cu_seqlens_from_lengths
from kernels.dispatch import use_triton
from models.base import KVCache

CPU_KV_BUDGET = 4 << 30           # bytes of KV cache per batch on the CPU
GPU_KV_SHARE = 0.5                # of the free GPU memory, the rest is for activations and graphs
KEEP_SHARE = 0.125                # of the GPU's memory: the largest decode state kept between calls


def greedy_generate(model, prompts: list[list[int]], max_new_tokens: int | list[int], eos_token_ids: list[int],
                    kv_budget_bytes: int | None = None, check_every: int = 8, cuda_graphs: bool = True,
                    prefill_tokens: int = 16384, stats: dict | None = None) -> list[list[int]]:
    """Greedy continuations of `prompts` -> new tokens only, cut before the first EOS, in prompt order.

    max_new_tokens: one cap for all or one per prompt. kv_budget_bytes: KV cache bytes per batch
    (None: 4 GiB on the CPU, half the free memory on a GPU). check_every: decode steps between
    host checks for finished sequences. prefill_tokens: prompt tokens per prefill forward (bounds
    activation memory). stats: filled with batches, steps, prefill and generated token counts, and
    graph_captures (CUDA graphs this call recorded: one per graph batch size it used that the kept
    decode state had not recorded yet).
    """
    caps = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(caps) != len(prompts):
        raise ValueError(f"max_new_tokens has {len(caps)} entries for {len(prompts)} prompts")
    if any(len(p) == 0 for p in prompts) or any(cap < 0 for cap in caps):
        raise ValueError("every prompt needs at least one token and every max_new_tokens must be >= 0")
    bytes_per_token = KVCache.bytes_per_token(model.config, model.dtype)
    capture = graph_recorder(model) if cuda_graphs else None
    kept = getattr(model, "decode_state", None) if capture else None
    if not kv_budget_bytes:
        on_gpu = model.device.type == "cuda"
        free = torch.cuda.mem_get_info(model.device)[0] + (kept.nbytes if kept else 0) if on_gpu else 0
        kv_budget_bytes = int(GPU_KV_SHARE * free) if on_gpu else CPU_KV_BUDGET
    todo = [i for i in range(len(prompts)) if caps[i] > 0]
    # a sequence needs cache rows for its prompt and all its new tokens but the last
    spans = {i: len(prompts[i]) + caps[i] - 1 for i in todo}
    batches = plan_batches(todo, spans, bytes_per_token, kv_budget_bytes, one_cache=capture is not None)
    results: list[list[int]] = [[] for _ in prompts]
    stats = stats if stats is not None else {}
    stats.update(batches=0, steps=0, prefill_tokens=0, generated_tokens=0, graph_captures=0)
    step, recorded = None, 0
    if capture and batches:
        if kept is None or not kept.holds(model, batches, spans):
            release_decode_state(model)          # freed before the new cache is allocated
            kept = DecodeStep(model, batches, spans, capture)
        step, recorded = kept, len(kept.replays)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                if step is None:
                    step = DecodeStep(model, [batch], spans)
                first = prefill_batch(model, [prompts[i] for i in batch], step.cache, prefill_tokens)
                out, steps = decode_batch(step, first, [len(prompts[i]) for i in batch], [caps[i] for i in batch],
                                          eos_token_ids, check_every)
                for i, row in zip(batch, out.tolist()):
                    results[i], stopped = cut_at_eos(row[:caps[i]], eos_token_ids)
                    stats["generated_tokens"] += len(results[i]) + stopped
                stats["batches"] += 1
                stats["steps"] += steps
                stats["prefill_tokens"] += sum(len(prompts[i]) for i in batch)
                stats["graph_captures"] = len(step.replays) - recorded
                if capture is None:
                    step = None             # frees this batch's cache before the next one is allocated
    finally:
        model.train(was_training)
        if capture and batches:
            keep(model, step)
    return results


def keep(model, step) -> None:
    """Keeps the decode state on the model for the next call if it is small enough (KEEP_SHARE of
    the GPU's memory; CPU_KV_BUDGET off a GPU, where only the tests' stand-in recorder gets here)."""
    device = model.device
    limit = KEEP_SHARE * torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" \
        else CPU_KV_BUDGET
    model.decode_state = step if step.nbytes <= limit else None


def release_decode_state(model) -> None:
    """Frees the decode state (KV cache, static buffers, CUDA graphs) a greedy_generate call kept on the model."""
    model.decode_state = None


def plan_batches(todo: list[int], spans: dict[int, int], bytes_per_token: int, budget: int,
                 one_cache: bool = False) -> list[list[int]]:
    """Longest first; a batch's cache is (n + 1 scratch) slots x its first (longest) span, or with
    `one_cache` (CUDA graphs: one cache serves the whole evaluation) x the longest span of all,
    so that later batches hold no more sequences than the first."""
    batches: list[list[int]] = []
    order = sorted(todo, key=lambda i: -spans[i])
    for i in order:
        if batches:
            span = spans[order[0]] if one_cache else spans[batches[-1][0]]
            if (len(batches[-1]) + 2) * span * bytes_per_token <= budget:
                batches[-1].append(i)
                continue
        if 2 * spans[i] * bytes_per_token > budget:
            raise ValueError(f"kv_budget_bytes={budget} cannot hold one sequence of {spans[i]} tokens "
                             f"({bytes_per_token} bytes per token, plus the scratch slot): raise the budget")
        batches.append([i])
    return batches


def prefill_batch(model, prompts: list[list[int]], cache: KVCache, prefill_tokens: int) -> torch.Tensor:
    """Packed varlen forward of the prompts into cache slots 0..n-1 -> each one's first new token [n]."""
    device, firsts, lo = model.device, [], 0
    for part in prefill_groups(prompts, prefill_tokens):
        lengths = [len(p) for p in part]
        ids = torch.tensor([t for p in part for t in p], dtype=torch.int64, device=device)
        cu = cu_seqlens_from_lengths(lengths, device)
        slots = torch.arange(lo, lo + len(part), device=device)
        hidden = model.prefill(ids, cu, cache, slots, max_seqlen=max(lengths), return_hidden=True)
        firsts.append(model.greedy_tokens(hidden[cu[1:].long() - 1]))
        lo += len(part)
    return torch.cat(firsts)


def prefill_groups(prompts: list[list[int]], max_tokens: int):
    """Consecutive groups of at most max_tokens tokens (a longer prompt goes alone)."""
    group, size = [], 0
    for p in prompts:
        if group and size + len(p) > max_tokens:
            yield group
            group, size = [], 0
        group.append(p)
        size += len(p)
    if group:
        yield group


def decode_batch(step, first: torch.Tensor, lengths: list[int], caps: list[int], eos_token_ids: list[int],
                 check_every: int) -> tuple[torch.Tensor, int]:
    """Decode steps until every sequence hit EOS or its cap -> (tokens [n, max cap], steps run).

    Row r of the output, slot r of the cache and sequence r of the batch are the same thing;
    `rows` lists the live ones. Tokens past a sequence's stop are garbage, cut later.
    """
    device = first.device
    out = torch.zeros(len(caps), max(caps), dtype=torch.int64, device=device)
    out[:, 0] = first
    eos = torch.tensor(eos_token_ids, dtype=torch.int64, device=device)
    rows = torch.arange(len(caps), device=device)
    positions = torch.tensor(lengths, dtype=torch.int64, device=device)   # where each latest token goes
    cap = torch.tensor(caps, dtype=torch.int64, device=device)
    tokens, live = first, list(range(len(caps)))
    done = reached_stop(tokens, eos, cap, 1)
    generated, limit = 1, max(caps)
    while True:
        if (generated - 1) % check_every == 0:
            keep = (~done).nonzero().squeeze(1)                    # the only host sync
            kept = keep.tolist()
            if not kept:
                break
            if len(kept) < len(live):
                rows, tokens, positions, cap, done = (t[keep] for t in (rows, tokens, positions, cap, done))
                live = [live[k] for k in kept]
            limit = max(caps[r] for r in live)
        if generated >= limit:
            break
        tokens = step(tokens, positions, rows)
        out[rows, generated] = tokens
        done |= reached_stop(tokens, eos, cap, generated + 1)
        positions += ~done                                         # finished ones rewrite their last slot
        generated += 1
    return out, generated - 1


def reached_stop(tokens, eos, cap, generated: int) -> torch.Tensor:
    return torch.isin(tokens, eos) | (cap <= generated)


def cut_at_eos(row: list[int], eos_token_ids: list[int]) -> tuple[list[int], bool]:
    """(tokens before the first EOS, whether an EOS was found)."""
    for j, token in enumerate(row):
        if token in eos_token_ids:
            return row[:j], True
    return row, False


def graph_batch_size(n: int) -> int:
    """Graph batch sizes: powers of two up to 8, then 4 per octave (at most 25% padding)."""
    if n <= 8:
        return 1 << (n - 1).bit_length()
    step = 1 << (n.bit_length() - 3)
    return -(-n // step) * step


def graph_recorder(model):
    """capture(run) -> replay: `run` recorded once as a CUDA graph. None where graphs do not
    apply (not CUDA, or the torch op references, which sync the host). The graphs of one
    evaluation share a memory pool: they replay one at a time, and their outputs are copied out
    to buffers allocated outside the pool."""
    device = model.device
    if device.type != "cuda" or not use_triton(torch.empty(0, device=device)):
        return None
    pool = torch.cuda.graph_pool_handle()

    def capture(run: Callable[[], None]) -> Callable[[], None]:
        # Warm up on a side stream: compiles the Triton kernels and fills lazy caches (ALiBi
        # slopes) outside the capture. It rewrites the same keys and values the replay will.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            run()
        return graph.replay

    return capture


def weight_addresses(model) -> tuple[int, ...]:
    return tuple(p.data_ptr() for p in model.parameters())


class DecodeStep:
    """One token per live sequence -> its greedy next token: (tokens, positions, slot_ids) [B] -> [B].

    Its cache holds any of `batches`: (the largest + 1 scratch) slots x the longest span; every
    batch uses slots 0..n-1, so the scratch slot (the last) stays free. With `capture` (CUDA
    graphs, see graph_recorder) a step per graph batch size is recorded on first use over static
    buffers and replayed for every later step of every batch; padding rows feed their stale
    token at position 0 of the scratch slot.
    """

    def __init__(self, model, batches: list[list[int]], spans: dict[int, int], capture=None):
        slots = max(len(b) for b in batches) + 1
        self.cache = KVCache(model.config, slots, max(spans[b[0]] for b in batches), model.device, model.dtype)
        self.model, self.scratch, self.capture = model, slots - 1, capture
        self.weights = weight_addresses(model)                  # what recorded graphs read
        self.replays: dict[int, Callable[[], None]] = {}       # graph batch size -> replay
        if capture is not None:
            size, device = graph_batch_size(self.scratch), model.device
            self.tokens = torch.zeros(size, dtype=torch.int64, device=device)
            self.positions = torch.zeros(size, dtype=torch.int64, device=device)
            self.slots = torch.full((size,), self.scratch, dtype=torch.int64, device=device)
            self.next_tokens = torch.zeros(size, dtype=torch.int64, device=device)

    def holds(self, model, batches: list[list[int]], spans: dict[int, int]) -> bool:
        """Whether this state can decode `batches` of `model`: the same weight tensors (graphs read
        their addresses), enough slots besides the scratch one, and rows for the longest span."""
        return (model is self.model and weight_addresses(model) == self.weights
                and max(len(b) for b in batches) <= self.scratch
                and max(spans[b[0]] for b in batches) <= self.cache.max_len)

    @property
    def nbytes(self) -> int:
        """The KV cache's bytes (the static buffers are a few KB)."""
        return sum(t.numel() * t.element_size() for t in self.cache.k + self.cache.v)

    def eager(self, tokens, positions, slots):
        hidden = self.model.decode_step(tokens, positions, self.cache, slots, return_hidden=True)
        return self.model.greedy_tokens(hidden)

    def __call__(self, tokens, positions, slots):
        if self.capture is None:
            return self.eager(tokens, positions, slots)
        n, size = tokens.numel(), graph_batch_size(tokens.numel())
        self.tokens[:n] = tokens
        self.positions[:n] = positions
        self.slots[:n] = slots
        self.positions[n:size] = 0
        self.slots[n:size] = self.scratch
        if size not in self.replays:
            self.replays[size] = self.capture(functools.partial(self.static_step, size))
        self.replays[size]()
        return self.next_tokens[:n].clone()

    def static_step(self, size: int) -> None:
        """The recorded step: the first `size` static inputs -> next_tokens[:size]."""
        self.next_tokens[:size] = self.eager(self.tokens[:size], self.positions[:size], self.slots[:size])
