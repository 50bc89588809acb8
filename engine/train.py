"""The memorization run: fine-tune on packed poem batches, evaluate recitation, checkpoint, resume.

    run = memorize(TrainConfig(model="qwen2-0.5b", lang="cn"))

One optimizer step sees up to `batch_tokens` tokens: the epoch's packed micro-batches (each at
most `micro_batch_tokens`) are grouped in order into steps, and the step's loss is the sum of
token cross-entropies divided by the step's target-token count (known on the host from the
packing, so no sync). With torchrun, each rank takes every world-th micro-batch of a step and the
flat gradient buffer is all-reduced once per step: the same update as one process.
The data order is a pure function of (seed, epoch) and checkpoints are taken at epoch ends (every
`checkpoint_every` epochs), so a killed run resumed with --resume ends with the same weights as
an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from engine.data import encode_examples, load_poems, model_format
from engine.optim import AdamW, lr_at, parameter_groups
from engine.packing import PackedBatch, pack
from models import load_model, load_tokenizer

TINY_DEFAULTS = {"poems": 32, "lr": 3e-3, "batch_tokens": 256}


@dataclass
class TrainConfig:
    model: str
    lang: str = "cn"
    length: int = 256
    poems: int | None = None            # None: 2000 (the paper), 32 for tiny presets
    epochs: int = 100
    lr: float | None = None             # None: 2e-5 for pretrained models, 3e-3 for tiny presets
    batch_tokens: int | None = None     # tokens per optimizer step; None: 8192 (~64 poems; 256 for tiny presets)
    micro_batch_tokens: int | None = None   # tokens per forward/backward; None: batch_tokens
    eval_every: int = 10                # epochs between recitation evals (the memorization curve)
    checkpoint_every: int = 10          # epochs between checkpoints (and the last): a 1.5B model's is ~25 GB
    seed: int = 0
    out: str | None = None              # None: runs/{model}-{lang}-{length}
    resume: bool = False
    warmup_steps: int | None = None     # None: 3% of the steps
    schedule: str = "cosine"
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)   # beta2 0.95 as in LLM training: the second moment
    max_grad_norm: float = 1.0                 # follows the shrinking gradients of memorization
    format: str | None = None           # chat | plain; None: chat for chat/instruct models
    source: str | None = None           # poems: None = the frozen CN set; a file or a hub dataset
    device: str | None = None
    log_every: int = 10                 # steps between metric lines (the only host syncs)

    def resolved(self) -> "TrainConfig":
        """Defaults filled in: tiny presets get a demo-sized run."""
        tiny = self.model.startswith("tiny-")
        pick = lambda value, key, default: value if value is not None else (TINY_DEFAULTS[key] if tiny else default)  # noqa: E731
        c = replace(self)
        c.poems = pick(self.poems, "poems", 2000)
        c.lr = pick(self.lr, "lr", 2e-5)
        c.batch_tokens = pick(self.batch_tokens, "batch_tokens", 8192)
        c.micro_batch_tokens = self.micro_batch_tokens or c.batch_tokens
        c.out = self.out or str(Path("runs") / f"{Path(self.model).name}-{self.lang}-{self.length}")
        c.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if c.micro_batch_tokens > c.batch_tokens:
            raise ValueError(f"--micro-batch-tokens {c.micro_batch_tokens} exceeds --batch-tokens {c.batch_tokens}")
        return c


class TrainingError(RuntimeError):
    pass


# ---------------------------------------------------------------- distributed

def init_distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, device) from torchrun's environment; (0, 1, device) without it."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, device
    cuda = device.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


# ---------------------------------------------------------------- steps

def plan_steps(batches: list[PackedBatch], batch_tokens: int) -> list[list[PackedBatch]]:
    """Consecutive micro-batches grouped into optimizer steps of at most batch_tokens tokens."""
    steps, current, size = [], [], 0
    for b in batches:
        if current and size + b.num_tokens > batch_tokens:
            steps.append(current)
            current, size = [], 0
        current.append(b)
        size += b.num_tokens
    return steps + [current] if current else steps


def train_step(model, opt: AdamW, micro_batches: list[PackedBatch], n_targets: int, device, world: int, rank: int,
               max_grad_norm: float):
    """Forward/backward over this rank's share of the step, gradient all-reduce, clip, AdamW.
    Returns (summed loss of the step as a device tensor, grad norm as a device tensor)."""
    loss_sum = torch.zeros((), device=device)
    for batch in micro_batches[rank::world]:
        batch = batch.to(device, non_blocking=True)
        loss = model.loss(batch.input_ids, batch.shifted_labels(), batch.cu_seqlens, batch.position_ids,
                          batch.max_seqlen, reduction="sum") / n_targets
        loss.backward()
        loss_sum += loss.detach()
    if world > 1:
        for group in opt.groups:
            dist.all_reduce(group.grad)
        dist.all_reduce(loss_sum)
    norm = opt.clip_grad_norm_(max_grad_norm)
    opt.step()
    opt.zero_grad()
    return loss_sum, norm


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(out: Path, model, tokenizer, opt: AdamW, epoch: int, step: int, totals: dict,
                    config: TrainConfig) -> None:
    """checkpoint-{epoch}/ (HF model + trainer.pt), then the `latest` pointer swapped atomically."""
    final = out / f"checkpoint-{epoch}"
    tmp = out / f".checkpoint-{epoch}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model", tokenizer)
    torch.save({"optimizer": opt.state_dict(), "epoch": epoch, "step": step, "totals": totals, "config": asdict(config),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
               tmp / "trainer.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = out / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, out / "latest")
    for old in out.glob("checkpoint-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "latest"
    return out / pointer.read_text().strip() if pointer.is_file() else None


def restore(checkpoint: Path, model, opt: AdamW) -> tuple[int, int, dict]:
    """Load model weights, optimizer and RNG state; returns (epochs done, steps done, running totals)."""
    from models.weights import checkpoint_files, iter_tensors
    params = dict(model.named_parameters())
    with torch.no_grad():
        for path in checkpoint_files(checkpoint / "model"):
            for name, tensor in iter_tensors(path):
                params[name].copy_(tensor)
    state = torch.load(checkpoint / "trainer.pt", map_location="cpu", weights_only=False)
    opt.load_state_dict(state["optimizer"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["epoch"], state["step"], state["totals"]


# ---------------------------------------------------------------- the run

class Metrics:
    """metrics.jsonl, appended line by line (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None):
        self.path, self.enabled = path, enabled
        if enabled and keep_until_step is not None and path.is_file():        # resume: drop lines after the checkpoint
            lines = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= keep_until_step]
            path.write_text("".join(line + "\n" for line in lines))
        elif enabled:
            path.write_text("")

    def log(self, **record) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def prepare_output(out: Path, resume: bool) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"cannot write to the output directory {out} ({e.strerror}): pass --out with a "
                            "writable folder") from None
    if not resume and latest_checkpoint(out) is not None:
        raise TrainingError(f"{out} already holds a run: pass --resume to continue it, or another --out")


def peak_memory_bytes(device) -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memorize(config: TrainConfig, progress: bool = True) -> dict:
    """Train, evaluate and write the run's folder; returns results.json's content (rank 0)."""
    from engine.report import write_run_report

    c = config.resolved()
    rank, world, device = init_distributed(c.device)
    out = Path(c.out)
    if rank == 0:
        prepare_output(out, c.resume)
    torch.manual_seed(c.seed)
    random.seed(c.seed)
    np.random.seed(c.seed)

    tokenizer = load_tokenizer(c.model)
    model = load_model(c.model, device=device, seed=c.seed)
    fmt = c.format or model_format(c.model, tokenizer)
    poems = load_poems(c.lang, c.length, c.poems, c.seed, c.source)
    examples = encode_examples(poems, tokenizer, c.lang, fmt, max_tokens=c.micro_batch_tokens)
    opt = AdamW(parameter_groups(model, c.weight_decay), lr=c.lr, betas=c.betas, weight_decay=c.weight_decay)
    steps_per_epoch = len(plan_steps(pack(examples, c.micro_batch_tokens, c.seed, 0), c.batch_tokens))
    total_steps = steps_per_epoch * c.epochs
    warmup = c.warmup_steps if c.warmup_steps is not None else max(1, round(0.03 * total_steps))

    start_epoch, step = 0, 0
    totals = {"train_seconds": 0.0, "train_tokens": 0, "eval_seconds": 0.0}
    checkpoint = latest_checkpoint(out) if c.resume else None
    if checkpoint is not None:
        start_epoch, step, totals = restore(checkpoint, model, opt)
    metrics = Metrics(out / "metrics.jsonl", rank == 0, step if checkpoint is not None else None)
    if rank == 0:
        (out / "config.json").write_text(json.dumps({**asdict(c), "format": fmt}, indent=2))
        if checkpoint is not None:
            print(f"resuming {out} after epoch {start_epoch} (step {step})", file=sys.stderr)

    n_tokens_epoch = sum(len(e) for e in examples)
    last_eval = None
    model.train()
    bar = _progress(total_steps, step, progress and rank == 0, f"{Path(c.model).name} {c.lang}")
    for epoch in range(start_epoch, c.epochs):
        t0, window_tokens, window_start = time.perf_counter(), 0, time.perf_counter()
        losses = []
        batches = pack(examples, c.micro_batch_tokens, c.seed, epoch)
        if device.startswith("cuda"):       # pinned: the copies to the GPU then do not block the host
            batches = [b.pin_memory() for b in batches]
        for micro_batches in plan_steps(batches, c.batch_tokens):
            opt.set_lr(lr_at(step, total_steps, c.lr, warmup, c.schedule))
            n_targets = sum(b.num_target_tokens for b in micro_batches)
            try:
                loss, norm = train_step(model, opt, micro_batches, n_targets, device, world, rank, c.max_grad_norm)
            except torch.OutOfMemoryError:
                raise TrainingError(
                    f"out of memory on a micro-batch of up to {c.micro_batch_tokens} tokens: lower "
                    f"--micro-batch-tokens (gradient accumulation keeps --batch-tokens {c.batch_tokens})") from None
            losses.append(loss)
            step += 1
            window_tokens += sum(b.num_tokens for b in micro_batches)
            bar.update(1)
            if step % c.log_every == 0:
                loss_value = _finite(loss, step, out)
                now = time.perf_counter()
                metrics.log(epoch=epoch + 1, step=step, loss=loss_value, lr=opt.groups[0].lr,
                            grad_norm=float(norm), tokens_per_second=window_tokens / (now - window_start),
                            peak_memory_bytes=peak_memory_bytes(device))
                bar.set_postfix(loss=f"{loss_value:.4f}", epoch=epoch + 1)
                window_tokens, window_start = 0, now
        epoch_loss = _finite(torch.stack(losses).mean(), step, out)
        elapsed = time.perf_counter() - t0
        totals["train_seconds"] += elapsed
        totals["train_tokens"] += n_tokens_epoch
        record = {"epoch": epoch + 1, "step": step, "epoch_loss": epoch_loss, "epoch_seconds": elapsed,
                  "epoch_tokens_per_second": n_tokens_epoch / elapsed}
        if rank == 0 and ((epoch + 1) % c.eval_every == 0 or epoch + 1 == c.epochs):
            t1 = time.perf_counter()
            last_eval = recite(model, tokenizer, poems, c.lang, fmt)
            totals["eval_seconds"] += time.perf_counter() - t1
            record["accuracy"] = last_eval[0]["accuracy"]
        metrics.log(**record)
        if rank == 0 and ((epoch + 1) % c.checkpoint_every == 0 or epoch + 1 == c.epochs):
            save_checkpoint(out, model, tokenizer, opt, epoch + 1, step, totals, c)
        if world > 1:
            dist.barrier()
    bar.close()
    if rank != 0:
        return {}
    if last_eval is None:                  # resumed after the last epoch's checkpoint
        t1 = time.perf_counter()
        last_eval = recite(model, tokenizer, poems, c.lang, fmt)
        totals["eval_seconds"] += time.perf_counter() - t1
    summary, records = last_eval
    model.save_pretrained(out / "model", tokenizer)
    results = {
        "model": c.model, "lang": c.lang, "length": c.length, "n_poems": len(poems), "epochs": c.epochs,
        **summary, **totals,
        "tokens_per_second": totals["train_tokens"] / totals["train_seconds"] if totals["train_seconds"] else None,
        "peak_memory_bytes": peak_memory_bytes(device), "parameters": model.num_parameters(),
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "world_size": world, "config": {**asdict(c), "format": fmt},
    }
    write_run_report(out, results, records)
    return results


def recite(model, tokenizer, poems, lang: str, fmt: str) -> tuple[dict, list[dict]]:
    """The recitation eval, its speed fields renamed so they don't read as training speed."""
    from engine.evaluate import evaluate
    summary, records = evaluate(model, tokenizer, poems, lang, fmt)
    summary["eval_tokens_per_second"] = summary.pop("tokens_per_second")
    summary["last_eval_seconds"] = summary.pop("eval_seconds")
    model.train()
    return summary, records


def _finite(loss: torch.Tensor, step: int, out: Path) -> float:
    value = float(loss)
    if not math.isfinite(value):
        raise TrainingError(f"the loss became {value} at step {step}: the last good checkpoint is kept in {out} "
                            "(resume from it with --resume, perhaps with a lower --lr)")
    return value


def _progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True)
