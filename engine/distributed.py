"""Data parallelism over torch.distributed (NCCL on GPUs, gloo on the CPU), as torchrun starts it.

    rank, world, device = init_distributed(device)         # (0, 1, device) without torchrun
    sync = GradSync(opt) if world > 1 else None             # after the optimizer: hooks on its buffers
    mine = shard_step(step_batches, world, rank, micro_batch_tokens)    # each step (the same batches on every rank)
    train_step(model, opt, mine, step_target_tokens, device, sync, ...)  # engine/train.py: backwards, sync.wait, step
    summary, records = evaluate_sharded(model, tokenizer, poems, lang, fmt, world, rank)  # rank 0 gets them

One step is the same global step as in one process: every rank sees the whole step (the data
order stays a pure function of seed and epoch), takes a token-balanced share of its sequences,
normalizes its loss by the step's global target-token count, and the gradients are summed over
ranks, so the update equals one process's up to fp32 summation order.

Communication per step: the optimizer's fp32 gradient buffers, 4 bytes per parameter, all-reduced
once (a ring all-reduce moves ~2x that over each rank's link), in buckets that start during the
backward of the step's last micro-batch.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.data import IGNORE, Example
from engine.packing import PackedBatch, bins_best_fit, collate

# Rank 0 writes checkpoints while the other ranks wait in a barrier: a 1.5B model's ~25 GB
# (bf16 weights, fp32 masters and moments) at 50 MB/s (a slow network disk) takes ~9 minutes,
# NCCL's whole default timeout of 10. An hour covers that several times over and still reports
# a real hang (a dead rank) within the hour.
TIMEOUT = timedelta(hours=1)
BUCKET_BYTES = 25 * 2 ** 20     # torch DDP's default bucket size


def init_distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, device) from torchrun's environment; (0, 1, device) without it.
    On GPUs each rank takes cuda:LOCAL_RANK."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, device
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return dist.get_rank(), dist.get_world_size(), device


# ---------------------------------------------------------------- sharding one step

def balanced_shares(lengths: list[int], world: int) -> list[list[int]]:
    """Indices split into `world` shares of near-equal total length (longest first onto the
    lightest share; ties to the lowest rank), each share in index order. Deterministic, so every
    rank computes the same split."""
    loads, shares = [0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = min(range(world), key=lambda r: loads[r])
        shares[r].append(i)
        loads[r] += lengths[i]
    return [sorted(share) for share in shares]


def examples_of(batch: PackedBatch) -> list[Example]:
    """The packed sequences back as Examples (labels are -100 on the prompt, the ids after it)."""
    cu, ids, labels = batch.cu_seqlens.tolist(), batch.input_ids.tolist(), batch.labels.tolist()
    examples = []
    for start, end in zip(cu, cu[1:]):
        prompt = next((i for i in range(start, end) if labels[i] != IGNORE), end) - start
        examples.append(Example(tuple(ids[start:start + prompt]), tuple(ids[start + prompt:end])))
    return examples


def shard_step(micro_batches: list[PackedBatch], world: int, rank: int, micro_batch_tokens: int) -> list[PackedBatch]:
    """This rank's micro-batches of one optimizer step: the step's sequences split into `world`
    token-balanced shares (by sequences, so a step of one packed micro-batch is shared too), this
    rank's share packed into micro-batches of at most micro_batch_tokens. One process: unchanged."""
    if world == 1:
        return micro_batches
    sequences = [e for b in micro_batches for e in examples_of(b)]
    mine = [sequences[i] for i in balanced_shares([len(e) for e in sequences], world)[rank]]
    bins = bins_best_fit([len(e) for e in mine], list(range(len(mine))), micro_batch_tokens)
    return [collate([mine[i] for i in sorted(b)]) for b in bins]


# ---------------------------------------------------------------- gradient synchronization

class GradSync:
    """Sums the optimizer's fp32 gradient buffers over ranks, overlapped with the backward.

    The buffers are cut into contiguous buckets of ~bucket_bytes in reverse parameter order (about
    the order the backward produces gradients). A post-accumulate-grad hook on each parameter,
    registered after the optimizer's (which has by then moved the gradient into the buffer),
    counts down its bucket; a complete bucket's async all_reduce starts at once, but buckets start
    in one fixed order on every rank (as torch DDP's reducer does) so the collectives pair up even
    when ranks finish buckets in different orders or run different numbers of micro-batches.
    wait() starts what is left (parameters without a gradient this step, a rank without
    sequences) and waits for all. Inside no_sync() the hooks only accumulate (all micro-batches
    of a step but the last)."""

    def __init__(self, opt, bucket_bytes: int = BUCKET_BYTES):
        self.syncing = True
        self.buckets: list[torch.Tensor] = []
        self.sizes: list[int] = []                  # parameters per bucket
        for g in reversed(opt.groups):
            end = start = g.grad.numel()
            count = 0
            for p in reversed(g.params):
                start, count = start - p.numel(), count + 1
                p.register_post_accumulate_grad_hook(lambda p, bucket=len(self.buckets): self._ready(bucket))
                if 4 * (end - start) >= bucket_bytes or p is g.params[0]:
                    self.buckets.append(g.grad[start:end])
                    self.sizes.append(count)
                    end, count = start, 0
        self._reset()

    def _reset(self) -> None:
        self.pending, self.launched, self.works = list(self.sizes), 0, []

    def _ready(self, bucket: int) -> None:
        if not self.syncing:
            return
        self.pending[bucket] -= 1
        while self.launched < len(self.buckets) and self.pending[self.launched] <= 0:
            self._launch()

    def _launch(self) -> None:
        self.works.append(dist.all_reduce(self.buckets[self.launched], async_op=True))
        self.launched += 1

    @contextlib.contextmanager
    def no_sync(self):
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True

    def wait(self, *tensors: torch.Tensor) -> None:
        """Finish this step's all-reduces, then sum `tensors` (e.g. the step's loss) over ranks in place."""
        while self.launched < len(self.buckets):
            self._launch()
        for work in self.works:
            work.wait()
        for t in tensors:
            dist.all_reduce(t)
        self._reset()


# ---------------------------------------------------------------- sharded evaluation

def all_gather(value, world: int) -> list:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if world == 1:
        return [value]
    values = [None] * world
    dist.all_gather_object(values, value)
    return values


def evaluate_sharded(model, tokenizer, poems, lang: str, fmt: str,
                     world: int, rank: int) -> tuple[dict | None, list[dict] | None]:
    """engine.evaluate.evaluate with each rank reciting poems[rank::world]: rank 0 returns the
    summary and records of all poems in their original order (the 1-rank evaluation's records);
    the other ranks return (None, None). Speed fields: the slowest rank's seconds, summed tokens."""
    from engine.evaluate import evaluate, summarize
    if world == 1:
        return evaluate(model, tokenizer, poems, lang, fmt)
    parts = [None] * world if rank == 0 else None          # each rank's (summary, records)
    dist.gather_object(evaluate(model, tokenizer, poems[rank::world], lang, fmt), parts, dst=0)
    if rank != 0:
        return None, None
    summaries, shares = zip(*parts)
    records = [shares[i % world][i // world] for i in range(sum(map(len, shares)))]    # poems[rank::world] undone
    seconds = max(s["eval_seconds"] for s in summaries)
    total = {key: sum(s[key] for s in summaries) for key in ("prompt_tokens", "generated_tokens", "decode_batches")}
    return {**summaries[0], **summarize(records), **total, "eval_seconds": seconds,
            "tokens_per_second": total["generated_tokens"] / seconds if seconds else 0.0,
            "decode_steps": max(s["decode_steps"] for s in summaries)}, records
