"""The memorization run: fine-tune on packed poem batches, evaluate recitation, checkpoint, resume.

    run = memorize(TrainConfig(model="qwen2-0.5b", lang="cn"))

One optimizer step sees up to `batch_tokens` tokens: the epoch's packed micro-batches (each at
most `micro_batch_tokens`) are grouped in order into steps, and the step's loss is the sum of
token cross-entropies divided by the step's target-token count (known on the host from the
packing, so no sync). With torchrun, each rank trains on a token-balanced share of every step's
sequences and the fp32 gradient buffers are all-reduced in buckets during the backward of its last
micro-batch (engine/distributed.py): the same update as one process, up to summation order.
The data order is a pure function of (seed, epoch) and checkpoints are taken at epoch ends (every
`checkpoint_every` epochs), so a killed run resumed with --resume ends with the same weights as
an uninterrupted one.

TrainConfig is the one description of a run's settings: each field carries its default, its
help, and where the default depends on the model (tiny presets train a demo-sized run) both
defaults. `cli.py memorize`'s flags are generated from it (add_flags / from_flags) and
config_flags turns a config back into those flags (the sweep's subprocesses).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from engine.data import encode_examples, load_poems, model_format
from engine.distributed import GradSync, all_gather, evaluate_sharded, init_distributed, shard_step
from engine.dynamics import EVALS_FILE, dynamics_summary, eval_lines
from engine.evaluate import resolve_device
from engine.optim import AdamW, lr_at, parameter_groups
from engine.packing import PackedBatch, pack
from engine.report import write_run_report
from engine.runs import (TrainingError, append_jsonl, claimed, keep_jsonl, keep_last_finite, read_jsonl, restore_newest,
                         run_dir, save_checkpoint, saved_config)
from engine.scoring import SCORE_BATCH_TOKENS, bits_summary, poem_bits
from models import load_model, load_tokenizer


class ConfigError(ValueError):
    pass


# Allowed ranges: (test, what the message says).
AT_LEAST_1 = (lambda value: value >= 1, "at least 1")
POSITIVE = (lambda value: value > 0, "above 0")
NOT_NEGATIVE = (lambda value: value >= 0, "0 or more")
BETA = (lambda value: 0 <= value < 1, "in [0, 1)")


def setting(help: str, default=None, *, full=None, tiny=None, choices=None, valid=None):
    """A TrainConfig field. full/tiny: the value a default of None stands for (tiny: for tiny presets);
    valid: its allowed range."""
    return field(default=default, metadata={"help": help, "full": full, "tiny": tiny, "choices": choices,
                                            "valid": valid})


@dataclass
class TrainConfig:
    model: str = field(metadata={"help": "a registry name (qwen2-0.5b, bloom-560m, tiny-qwen2, ...) or a folder"})
    lang: str = setting("poem language", "cn", choices=("cn", "en"))
    length: int = setting("prompt + poem characters: 256 (<= 256) or 512 (257..512, the paper's Table 2)", 256,
                          choices=(256, 512))
    poems: int | None = setting("poems to sample", full=2000, tiny=32, valid=AT_LEAST_1)
    epochs: int = setting("passes over the poems", 100, valid=AT_LEAST_1)
    lr: float | None = setting("peak learning rate", full=2e-5, tiny=3e-3, valid=POSITIVE)
    batch_tokens: int | None = setting("tokens per optimizer step (8192: ~64 poems, ~30 steps per epoch of 2,000)",
                                       full=8192, tiny={256: 256, 512: 1024}, valid=AT_LEAST_1)
    micro_batch_tokens: int | None = setting("tokens per forward/backward (default: --batch-tokens)", valid=AT_LEAST_1)
    eval_every: int = setting("epochs between recitation evaluations (the memorization curve)", 10, valid=AT_LEAST_1)
    checkpoint_every: int = setting("epochs between checkpoints (and the last): a 1.5B model's is ~25 GB", 10,
                                    valid=AT_LEAST_1)
    seed: int = setting("seeds the poem sample, the weights of a preset and the data order", 0)
    out: str | None = setting("output folder (default runs/MODEL-LANG-LENGTH)")
    resume: bool = setting("continue the run in --out from its last checkpoint", False)
    warmup_steps: int | None = setting("linear warmup steps (default: 3%% of the steps)", valid=NOT_NEGATIVE)
    schedule: str = setting("learning-rate schedule after the warmup", "cosine", choices=("cosine", "constant"))
    weight_decay: float = setting("on matrices only (not norms, biases, embeddings)", 0.01, valid=NOT_NEGATIVE)
    # beta2 0.95 as in LLM training: the second moment follows the shrinking gradients of memorization
    betas: tuple[float, float] = setting("AdamW's moment decay rates beta1 beta2", (0.9, 0.95), valid=BETA)
    max_grad_norm: float = setting("global gradient-norm clipping", 1.0, valid=POSITIVE)
    format: str | None = setting("prompt format (default: chat for chat/instruct models)", choices=("chat", "plain"))
    source: str | None = setting("a local .parquet/.jsonl/.json/.csv file or a hub dataset "
                                 "(default: the frozen CN set)")
    device: str | None = setting("cpu, cuda, cuda:1 (default: cuda when available). On a CPU the thread count "
                                 "follows the model's size (1 for the tiny presets, whose matmuls are too small to "
                                 "share): set OMP_NUM_THREADS to choose it")
    log_every: int = setting("steps between metric lines (each one syncs the host)", 10, valid=AT_LEAST_1)
    keep_checkpoints: int = setting("newest checkpoints kept: an unreadable latest one falls back to the one before",
                                    2, valid=AT_LEAST_1)

    @staticmethod
    def default(name: str, tiny: bool = False, length: int = 256):
        """The value a field takes when not given: `resolved()`'s choice for a pretrained model or a tiny
        preset (a preset's budget grows with the length bin, so that its longest poem fits)."""
        meta = FIELDS[name].metadata
        if meta.get("full") is None:
            return FIELDS[name].default
        value = meta["tiny"] if tiny else meta["full"]
        return value[length] if isinstance(value, dict) else value

    def resolved(self) -> "TrainConfig":
        """Defaults filled in (tiny presets get a demo-sized run), every value checked: raises ConfigError."""
        for name in FIELDS:
            check_value(name, getattr(self, name))
        tiny = self.model.startswith("tiny-")
        filled = replace(self, **{name: self.default(name, tiny, self.length) for name in FIELDS
                                  if getattr(self, name) is None})
        if filled.micro_batch_tokens is None:
            filled.micro_batch_tokens = filled.batch_tokens
        filled.out = self.out or str(run_dir("runs", self.model, self.lang, self.length))
        filled.device = resolve_device(self.device)
        if filled.micro_batch_tokens > filled.batch_tokens:
            raise ConfigError(f"--micro-batch-tokens {filled.micro_batch_tokens} exceeds --batch-tokens "
                              f"{filled.batch_tokens}: it must be at most --batch-tokens")
        return filled


FIELDS = {spec.name: spec for spec in fields(TrainConfig)}
# What a resumed run may change: how often it reports and saves, where it runs. Everything else
# gives the run its meaning and must match the saved configuration (epochs may grow).
FREE_ON_RESUME = {"eval_every", "checkpoint_every", "log_every", "keep_checkpoints", "device", "out", "resume"}


def check_value(name: str, value) -> None:
    """ConfigError naming the flag and its allowed range when `value` is outside it (other names pass)."""
    spec = FIELDS.get(name)
    test, allowed = (spec.metadata.get("valid") if spec else None) or (None, None)
    values = value if isinstance(value, (tuple, list)) else [value]
    if test is not None and value is not None and not all(map(test, values)):
        raise ConfigError(f"{flag(name)} must be {allowed} (got {shown(value)})")


# ---------------------------------------------------------------- the config as command-line flags

def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def shown(value) -> str:
    """A value as its flag's arguments on the command line (a pair: `0.9 0.95`)."""
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def add_flags(parser: argparse.ArgumentParser, names=None, defaults=None) -> None:
    """One flag per TrainConfig field (or the named ones); `defaults` overrides a field's default."""
    for name in names or FIELDS:
        spec, meta = FIELDS[name], FIELDS[name].metadata
        default = (defaults or {}).get(name, None if spec.default is MISSING else spec.default)
        tiny = meta.get("tiny")
        tiny = ", ".join(f"{v} at --length {k}" for k, v in tiny.items()) if isinstance(tiny, dict) else tiny
        text = meta["help"]
        if meta.get("full") is not None and default is None:
            text += f" (default {meta['full']}; for tiny presets {tiny})"
        elif default is not None and default is not False:
            text += f" (default {shown(default)})"
        if isinstance(default, bool):
            parser.add_argument(flag(name), action="store_true", help=text)
        elif isinstance(default, tuple):
            parser.add_argument(flag(name), type=float, nargs=len(default), default=default, metavar="B", help=text)
        else:
            parser.add_argument(flag(name), type={"int": int, "float": float}.get(spec.type.split()[0], str),
                                default=default, choices=meta.get("choices"), required=spec.default is MISSING,
                                help=text)


def from_flags(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{name: tuple(value) if isinstance(value, list) else value
                          for name, value in vars(args).items() if name in FIELDS})


def config_flags(config: TrainConfig) -> list[str]:
    """The flags add_flags' parser turns back into `config`: every field that differs from its default."""
    args = []
    for name, spec in FIELDS.items():
        value = getattr(config, name)
        if value != spec.default:
            values = [] if value is True else value if isinstance(value, tuple) else [value]
            args += [flag(name), *map(str, values)]
    return args


# ---------------------------------------------------------------- one step

def plan_steps(batches: list[PackedBatch], batch_tokens: int) -> list[list[PackedBatch]]:
    """Consecutive micro-batches grouped into optimizer steps of at most batch_tokens tokens."""
    steps, current, size = [], [], 0
    for batch in batches:
        if current and size + batch.num_tokens > batch_tokens:
            steps.append(current)
            current, size = [], 0
        current.append(batch)
        size += batch.num_tokens
    return steps + [current] if current else steps


def train_step(model, opt: AdamW, micro_batches: list[PackedBatch], n_targets: int, device, sync: GradSync | None,
               max_grad_norm: float):
    """Forward/backward over this rank's micro-batches of the step (the gradient all-reduce starts in
    the last one's backward), clip, AdamW (which consumes the gradients).
    Returns (summed loss of the step as a device tensor, grad norm as a device tensor)."""
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        batch = batch.to(device, non_blocking=True)
        with sync.no_sync() if sync and i < len(micro_batches) - 1 else contextlib.nullcontext():
            loss = model.loss(batch.input_ids, batch.shifted_labels(), batch.cu_seqlens, batch.position_ids,
                              batch.max_seqlen, reduction="sum") / n_targets
            loss.backward()
        loss_sum += loss.detach()
    if sync:
        sync.wait(loss_sum)
    norm = opt.step(max_grad_norm)     # clipping inside the update's pass
    return loss_sum, norm


# ---------------------------------------------------------------- the run

@dataclass
class Run:
    """What memorize's phases share: the resolved config, the model and its data, the progress."""
    config: TrainConfig
    out: Path
    rank: int
    world: int
    device: str
    model: object
    tokenizer: object
    fmt: str
    poems: list
    examples: list
    opt: AdamW
    total_steps: int
    warmup_steps: int
    epoch: int = 0                    # epochs done
    step: int = 0                     # optimizer steps done
    totals: dict = field(default_factory=lambda: {"train_seconds": 0.0, "train_tokens": 0, "eval_seconds": 0.0})
    last_eval: tuple | None = None    # (summary, records) of the latest recitation evaluation; (None, None) off rank 0
    sync: GradSync | None = None      # the gradient all-reduce (torchrun with more than one rank)
    rank_tokens: int = 0              # tokens this rank trained on since this process started
    base_bits: list | None = None     # each poem's target NLL in bits under the base model (rank 0)
    last_bits: list | None = None     # the same at the latest evaluation (rank 0)

    def due(self, every: int) -> bool:
        """Is the epoch just finished one of every `every`-th, or the last?"""
        return self.epoch % every == 0 or self.epoch == self.config.epochs

    def log(self, **record) -> None:
        """A metrics.jsonl line (rank 0 writes it)."""
        if self.rank == 0:
            append_jsonl(self.out / "metrics.jsonl", [record])


def memorize(config: TrainConfig, progress: bool = True) -> dict:
    """Train, evaluate and write the run's folder; returns results.json's content (rank 0)."""
    config = config.resolved()
    rank, world, device = init_distributed(config.device)
    with claimed(Path(config.out), config.resume) if rank == 0 else contextlib.nullcontext():
        if rank == 0 and config.resume:
            check_resume(config)
        run = setup(config, rank, world, device)
        with cpu_threads(run.device, run.model.num_parameters()):
            if rank == 0:                      # before resume() loads trained weights
                run.base_bits = score(run)
            resumed = resume(run) is not None
            if rank == 0:                      # the lines after the checkpoint are redone; a fresh run keeps none
                keep_jsonl(run.out / "metrics.jsonl", lambda line: resumed and line["step"] <= run.step)
                keep_jsonl(run.out / EVALS_FILE, lambda line: line["epoch"] <= run.epoch)
                if not resumed:
                    run.log(epoch=0, step=0, bits=sum(run.base_bits))
            train(run, progress and rank == 0)
            if run.last_eval is None:          # resumed after the last epoch's checkpoint: redo its evaluation
                if rank == 0:
                    keep_jsonl(run.out / EVALS_FILE, lambda line: line["epoch"] < run.epoch)
                recite(run)
            tokens_per_rank = all_gather(run.rank_tokens, world)
            return finish(run, tokens_per_rank) if rank == 0 else {}


def train(run: Run, progress: bool) -> None:
    """The epochs left: each trained, evaluated every eval_every and checkpointed every checkpoint_every."""
    from tqdm import tqdm
    config = run.config
    desc = f"{Path(config.model).name} {config.lang}"
    with tqdm(total=run.total_steps, initial=run.step, disable=not progress, desc=desc, unit="step",
              dynamic_ncols=True) as bar:
        while run.epoch < config.epochs:
            record = train_epoch(run, bar)
            if run.due(config.eval_every):
                summary = recite(run)          # every rank evaluates its share
                if run.rank == 0:
                    record.update(accuracy=summary["accuracy"], bits=summary["bits"],
                                  bits_gained=sum(run.base_bits) - summary["bits"])
            run.log(**record)
            if run.rank == 0 and run.due(config.checkpoint_every):
                save_checkpoint(run.out, run.model, run.tokenizer, run.opt, run.epoch, run.step, run.totals, config,
                                config.keep_checkpoints)
            if run.world > 1:
                dist.barrier()


def check_resume(config: TrainConfig) -> None:
    """Refuse a resume that would change the run's meaning; say so when it extends the run."""
    saved = saved_config(config.out)
    if saved is None:
        return
    differences = []
    for name, value in json.loads(json.dumps(asdict(config))).items():      # tuples as lists, as in config.json
        old = saved.get(name)
        if (name in FREE_ON_RESUME or value == old or (name == "format" and value is None)
                or (name == "epochs" and value > old)):        # epochs may grow: the run is extended
            continue
        differences.append(f"{flag(name)} {shown(value)} (the run: {shown(old)})")
    if differences:
        raise TrainingError(f"--resume: {config.out} was trained with other settings: {'; '.join(differences)}. "
                            "Resume with the run's own settings, or start a new run with another --out")
    if config.epochs > saved["epochs"]:
        print(f"extending the run in {config.out} from {saved['epochs']} to {config.epochs} epochs (the learning-rate "
              "schedule stretches to the new length)", file=sys.stderr)


def setup(config: TrainConfig, rank: int, world: int, device: str) -> Run:
    """Seed every generator, load the model, the poems and the optimizer."""
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, device=device, seed=config.seed)
    fmt = config.format or model_format(config.model, tokenizer)
    poems = load_poems(config.lang, config.length, config.poems, config.seed, config.source)
    examples = encode_examples(poems, tokenizer, config.lang, fmt, max_tokens=config.micro_batch_tokens)
    opt = AdamW(parameter_groups(model, config.weight_decay), lr=config.lr, betas=config.betas,
                weight_decay=config.weight_decay)
    steps_per_epoch = len(plan_steps(pack(examples, config.micro_batch_tokens, config.seed, 0), config.batch_tokens))
    total_steps = steps_per_epoch * config.epochs
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, round(0.03 * total_steps))
    return Run(config, Path(config.out), rank, world, device, model, tokenizer, fmt, poems, examples, opt, total_steps,
               warmup, sync=GradSync(opt) if world > 1 else None)


def resume(run: Run) -> Path | None:
    """With --resume: the newest readable checkpoint's weights, optimizer, RNG and progress; writes
    config.json. Returns the checkpoint resumed from, if any."""
    checkpoint = None
    if run.config.resume:
        checkpoint, state = restore_newest(run.out, run.model, run.opt)
        if checkpoint is not None:
            run.epoch, run.step, run.totals = state
    if run.rank == 0:
        (run.out / "config.json").write_text(json.dumps(saved_run_config(run), indent=2))
        if checkpoint is not None:
            print(f"resuming {run.out} after epoch {run.epoch} (step {run.step})", file=sys.stderr)
        elif run.config.resume:
            print(f"{run.out} holds no checkpoint yet: the run starts from the beginning", file=sys.stderr)
    return checkpoint


def train_epoch(run: Run, bar) -> dict:
    """One pass over the poems in the epoch's packed order; returns the epoch's metrics record."""
    config = run.config
    start = window_start = time.perf_counter()
    window_tokens, losses = 0, []
    batches = pack(run.examples, config.micro_batch_tokens, config.seed, run.epoch)
    for micro_batches in plan_steps(batches, config.batch_tokens):
        run.opt.set_lr(lr_at(run.step, run.total_steps, config.lr, run.warmup_steps, config.schedule))
        n_targets = sum(batch.num_target_tokens for batch in micro_batches)      # the whole step's, all ranks
        mine = shard_step(micro_batches, run.world, run.rank, config.micro_batch_tokens)
        if run.device.startswith("cuda"):       # pinned: the copies to the GPU then do not block the host
            mine = [batch.pin_memory() for batch in mine]
        run.rank_tokens += sum(batch.num_tokens for batch in mine)
        try:
            loss, norm = train_step(run.model, run.opt, mine, n_targets, run.device, run.sync, config.max_grad_norm)
        except torch.OutOfMemoryError:
            raise TrainingError(
                f"out of memory on a micro-batch of up to {config.micro_batch_tokens} tokens: lower "
                f"--micro-batch-tokens (gradient accumulation keeps --batch-tokens {config.batch_tokens})") from None
        losses.append(loss)
        run.step += 1
        window_tokens += sum(batch.num_tokens for batch in micro_batches)
        bar.update(1)
        if run.step % config.log_every == 0:
            loss_value = _finite(loss, run)
            now = time.perf_counter()
            run.log(epoch=run.epoch + 1, step=run.step, loss=loss_value, lr=run.opt.groups[0].lr,
                    grad_norm=float(norm), tokens_per_second=window_tokens / (now - window_start),
                    peak_memory_bytes=peak_memory_bytes(run.device))
            bar.set_postfix(loss=f"{loss_value:.4f}", epoch=run.epoch + 1)
            window_tokens, window_start = 0, now
    epoch_loss = _finite(torch.stack(losses).mean(), run)
    elapsed = time.perf_counter() - start
    epoch_tokens = sum(len(example) for example in run.examples)
    run.totals["train_seconds"] += elapsed
    run.totals["train_tokens"] += epoch_tokens
    run.epoch += 1
    return {"epoch": run.epoch, "step": run.step, "epoch_loss": epoch_loss, "epoch_seconds": elapsed,
            "epoch_tokens_per_second": epoch_tokens / elapsed}


def recite(run: Run) -> dict | None:
    """The recitation evaluation, sharded over the ranks (every rank must call it; rank 0 gets the
    summary, the others None), its speed fields renamed so they don't read as training speed; on
    rank 0 the poems' bits under the model too, and each poem's result appended to evals.jsonl."""
    start = time.perf_counter()
    summary, records = evaluate_sharded(run.model, run.tokenizer, run.poems, run.config.lang, run.fmt, run.world,
                                        run.rank)
    run.totals["eval_seconds"] += time.perf_counter() - start
    run.model.train()
    run.last_eval = summary, records
    if summary is not None:
        summary["eval_tokens_per_second"] = summary.pop("tokens_per_second")
        summary["last_eval_seconds"] = summary.pop("eval_seconds")
        run.last_bits = score(run)
        summary["bits"] = sum(run.last_bits)
        append_jsonl(run.out / EVALS_FILE, eval_lines(run.epoch, records, run.last_bits))
    return summary


def score(run: Run) -> list[float]:
    """Each training poem's target NLL in bits under the model now (engine/scoring.py), timed."""
    start = time.perf_counter()
    # forward only, nothing kept for backward: batches larger than training's cost no more memory
    bits = poem_bits(run.model, run.examples, max(run.config.micro_batch_tokens, SCORE_BATCH_TOKENS))
    run.totals["score_seconds"] = run.totals.get("score_seconds", 0.0) + time.perf_counter() - start
    return bits


def finish(run: Run, tokens_per_rank: list[int]) -> dict:
    """The final model, results.json and the run's report; returns results.json's content."""
    summary, records = run.last_eval
    for record, base, trained in zip(records, run.base_bits, run.last_bits):
        record.update(base_bits=round(base, 4), bits=round(trained, 4))
    config, totals = run.config, run.totals
    run.model.save_pretrained(run.out / "model", run.tokenizer)
    results = {
        "model": config.model, "lang": config.lang, "length": config.length, "n_poems": len(run.poems),
        "epochs": config.epochs, **summary, **totals,
        "tokens_per_second": totals["train_tokens"] / totals["train_seconds"] if totals["train_seconds"] else None,
        "peak_memory_bytes": peak_memory_bytes(run.device), "parameters": run.model.num_parameters(),
        "device": torch.cuda.get_device_name(run.device) if run.device.startswith("cuda") else "cpu",
        "world_size": run.world, "train_tokens_per_rank": tokens_per_rank, "config": saved_run_config(run),
        "memorization": {**bits_summary(run.base_bits, run.last_bits, run.model.num_parameters(), summary["correct"]),
                         "target_tokens": sum(len(example.target_ids) for example in run.examples)},
        "dynamics": dynamics_summary(read_jsonl(run.out / EVALS_FILE)),
    }
    write_run_report(run.out, results, records)
    return results


def saved_run_config(run: Run) -> dict:
    return {**asdict(run.config), "format": run.fmt}


PARAMETERS_PER_THREAD = 20_000_000


@contextlib.contextmanager
def cpu_threads(device: str, parameters: int):
    """On a CPU (unless OMP_NUM_THREADS says otherwise), one thread per PARAMETERS_PER_THREAD
    parameters: a tiny model's matmuls gain nothing from more threads, and OpenMP threads that
    spin-wait on each other slow down tenfold on a busy machine."""
    before = torch.get_num_threads()
    if torch.device(device).type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, min(before, parameters // PARAMETERS_PER_THREAD)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def peak_memory_bytes(device) -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _finite(loss: torch.Tensor, run: Run) -> float:
    value = float(loss)
    if math.isfinite(value):
        return value
    kept = keep_last_finite(run.out) if run.rank == 0 else None
    advice = "start a new run with a lower --lr"
    if kept is None:
        raise TrainingError(f"the loss became {value} at step {run.step} and no checkpoint in {run.out} holds finite "
                            f"weights: {advice}")
    raise TrainingError(f"the loss became {value} at step {run.step}: {kept} is the last checkpoint with finite "
                        f"weights, kept as {run.out / 'latest'}; {advice} (its weights can seed one: --model "
                        f"{kept / 'model'})")

