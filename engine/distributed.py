"""Data parallelism over torch.distributed (NCCL on GPUs, gloo on the CPU), as torchrun starts it.

    with distributed(device) as (rank, world, device):      # (0, 1, device) without torchrun
        model = shard_model(model, world, torch.bfloat16)   # FSDP2; before the optimizer (world > 1)
        mine = shard_step(step_batches, world, rank, micro_batch_tokens)    # each step (the same batches on every rank)
        train_step(model, opt, mine, step_target_tokens, device, ...)       # engine/train.py: backwards, step
        with gathered(model) as whole:                       # every rank; the plain model over gathered weights
            summary, records = evaluate_sharded(whole, tokenizer, poems, lang, fmt, world, rank)  # rank 0 gets them

One step is the same global step as in one process: every rank sees the whole step (the data
order stays a pure function of seed and epoch), takes a token-balanced share of its sequences,
normalizes its loss by the step's global target-token count, and the gradients are summed over
ranks, so the update equals one process's up to fp32 summation order.

The model is sharded with PyTorch's FSDP2 (fully_shard per block and at the root): each rank holds
1/N of the fp32 weights (the master weights), of the fp32 gradients and of the AdamW moments, and
engine.optim.AdamW steps its local shards. Communication per step and micro-batch, each rank: the
weights all-gathered in the compute dtype (2 bytes a parameter, twice for models above
RESHARD_ABOVE), the gradients reduce-scattered in fp32 (4 bytes), each (N - 1)/N of it over its link
(step_traffic_bytes); FSDP2 overlaps them with the blocks' compute.
"""
from __future__ import annotations

import contextlib
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.data import IGNORE, Example
from engine.generate import release_decode_state
from engine.packing import PackedBatch, bins_best_fit, collate
from models import model_class

# A checkpoint's writes end in a barrier: a 1.5B model's ~21 GB (bf16 model/, fp32 masters and
# moments) at 50 MB/s (a slow network disk, all ranks writing their shards to it) take ~7 minutes,
# most of NCCL's default timeout of 10. An hour covers that several times over and still reports
# a real hang (a dead rank) within the hour.
TIMEOUT = timedelta(hours=1)


@contextlib.contextmanager
def distributed(device: str):
    """(rank, world size, device) from torchrun's environment, the process group up for the block;
    (0, 1, device) without torchrun. On GPUs each rank takes cuda:LOCAL_RANK.

    A block that ends normally ends in a barrier (rank 0 may still be writing the run's results) and
    tears the group down on every rank. A block that raises leaves the group as it is: a peer may be
    waiting in a collective this rank will never join, and the launcher stops the other ranks once
    one has failed. The process itself ends through exit_rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield 0, 1, device
        return
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    yield dist.get_rank(), dist.get_world_size(), device
    dist.barrier()
    dist.destroy_process_group()


def exit_rank(status: int):
    """Ends one of torchrun's processes with `status`, its output flushed, without the interpreter's
    finalization. gloo's worker threads outlive destroy_process_group (FSDP2's device mesh keeps the
    group), and one may still be releasing the last collective's work, which holds tensors of
    FSDP2's all-gathers, when the main thread finalizes: its decref then waits for a GIL that never
    comes, the thread is unwound through a noexcept destructor and the process aborts ("terminate
    called without an active exception", SIGABRT; 10 of 30 4-rank exits with torch 2.13 on the CPU).
    Every file of the run is written and closed before this."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


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
    rank's share packed into micro-batches of at most micro_batch_tokens. Every rank gets as many
    micro-batches as the busiest: FSDP2's collectives pair up forward by forward, so a rank with less
    to do runs idle ones (one token, nothing to predict: zero loss and gradient). One process: unchanged."""
    if world == 1:
        return micro_batches
    sequences = [e for b in micro_batches for e in examples_of(b)]
    packed = []
    for share in balanced_shares([len(e) for e in sequences], world):
        bins = bins_best_fit([len(sequences[i]) for i in share], list(range(len(share))), micro_batch_tokens)
        packed.append([[sequences[share[i]] for i in sorted(b)] for b in bins])
    idle = [[IDLE]] * (max(map(len, packed)) - len(packed[rank]))
    return [collate(examples) for examples in packed[rank] + idle]


IDLE = Example((0,), ())      # an idle micro-batch's one token: no target


# ---------------------------------------------------------------- FSDP2

# Above this many parameters each block's gathered weights are freed after its forward and gathered
# again for its backward (FSDP2's reshard_after_forward). Below it, they stay gathered from the
# forward to the end of the backward: one all-gather per block and step instead of two, for 2 bytes
# a parameter held through the step (3.4 GB at the paper's largest, 1.7B; a 7B model's 14 GB would
# crowd out activations).
RESHARD_ABOVE = 3_000_000_000


def blocks(model) -> torch.nn.ModuleList:
    """The model's transformer blocks (its one ModuleList)."""
    return next(module for module in model.modules() if isinstance(module, torch.nn.ModuleList))


def shard_model(model, world: int, compute_dtype: torch.dtype, device: str | None = None):
    """FSDP2 over `world` ranks: each block sharded on its own, then the root (embedding, final norm,
    output layer). The model comes in fp32: its shards are the master weights; the forward and backward
    run in compute_dtype (MixedPrecisionPolicy) and gradients are reduce-scattered in fp32. A model on
    the meta device (models.load_model's `shard`) names the `device` its shards will be allocated on."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(torch.device(device or model.device).type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    reshard = model.num_parameters() > RESHARD_ABOVE
    units = [fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard) for block in blocks(model)]
    model = fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    for unit in units + [model]:
        # summed, not averaged: each rank's loss is already divided by the whole step's target count
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)    # a plain SUM (gloo has no PREMUL_SUM)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model):
    """The whole model on every rank, for evaluation, scoring and saving: under FSDP2 every unit's
    weights are gathered (in the compute dtype) and a plain module of the same class is built over
    them, without copies and without FSDP's hooks, so one rank alone may run forward passes (rank 0
    scores) and the decoder runs as in one process (CUDA graphs included); resharded after. Every
    rank must enter it. One process: the model itself."""
    if not is_sharded(model):
        yield model
        return
    units = [module for module in model.modules() if is_sharded(module)]
    for unit in units:
        unit.unshard()
    with torch.device("meta"):                      # the model's own class (FSDP2 subclassed it)
        plain = model_class(model.config)(model.config)
    try:
        plain.load_state_dict({name: p.detach() for name, p in model.named_parameters()}, assign=True)
        plain.source_dir = getattr(model, "source_dir", None)
        yield plain.eval()
    finally:
        release_decode_state(plain)     # its graphs read the gathered weights, which resharding frees
        for unit in units:
            unit.reshard()


def step_traffic_bytes(parameters: int, world: int, param_bytes: int = 2, reshard: bool = False) -> int:
    """Bytes each rank sends (and receives) in one step's collectives under FSDP2, ring algorithms: the
    all-gather of the weights in the compute dtype (twice with resharding after the forward) and the
    reduce-scatter of the fp32 gradients, each (N - 1) / N of the whole."""
    share = (world - 1) / world
    return round(share * parameters * (param_bytes * (2 if reshard else 1) + 4))


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
