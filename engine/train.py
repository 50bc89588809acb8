"""The memorization run: fine-tune on packed poem batches, evaluate recitation, checkpoint, resume.

    run = memorize(TrainConfig(model="qwen2-0.5b", lang="cn"))

One optimizer step sees up to `batch_tokens` tokens: the epoch's packed micro-batches (each at
most `micro_batch_tokens`) are grouped in order into steps, and the step's loss is the sum of
token cross-entropies divided by the step's target-token count (known on the host from the
packing, so no sync). With torchrun, the model is sharded with FSDP2 and each rank
trains on a token-balanced share of every step's sequences (engine/distributed.py): the same
update as one process, up to summation order.
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

from engine.console import Console, duration, size
from engine.data import encode_examples, fingerprint, load_poems, local_path, model_format
from engine.distributed import all_gather, distributed, evaluate_sharded, gathered, shard_model, shard_step
from engine.dynamics import EVALS_FILE, dynamics_summary, eval_lines
from engine.evaluate import resolve_device
from engine.optim import AdamW, lr_at, model_names, parameter_groups
from engine.provenance import model_source, now, provenance
from engine.packing import PackedBatch, pack
from engine.report import write_run_report
from engine.runs import (TRAINING_FILE, TrainingError, append_jsonl, check_output, claimed, keep_jsonl, keep_last_finite,
                         read_jsonl, restore_newest, run_dir, run_settings, save_checkpoint, training_record, write_json,
                         written_whole)
from engine.scoring import SCORE_BATCH_TOKENS, bits_summary, poem_bits
from models import load_model, load_tokenizer
from models.registry import resolve as resolve_model


class ConfigError(ValueError):
    pass


# Allowed ranges: (test, what the message says).
AT_LEAST_1 = (lambda value: value >= 1, "at least 1")
POSITIVE = (lambda value: 0 < value < math.inf, "a finite number above 0")
NOT_NEGATIVE = (lambda value: value >= 0, "0 or more")
DECAY = (lambda value: 0 <= value < math.inf, "a finite number, 0 or more")
BETA = (lambda value: 0 <= value < 1, "in [0, 1)")
SEED = (lambda value: 0 <= value < 2 ** 32, "in [0, 2^32)")
NOT_EMPTY = (lambda value: bool(str(value).strip()), "a folder name, not empty")


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
    checkpoint_every: int = setting("epochs between checkpoints (and the last); 0: none, only the final model (a kill "
                                    "then loses the run). A checkpoint holds the weights, fp32 master weights and both "
                                    "AdamW moments: 14 bytes a parameter in bf16, ~7 GB for a 0.5B model", 10,
                                    valid=NOT_NEGATIVE)
    seed: int = setting("seeds the poem sample, the weights of a preset and the data order", 0, valid=SEED)
    out: str | None = setting("output folder (default runs/MODEL-LANG-LENGTH)", valid=NOT_EMPTY)
    resume: bool = setting("continue the run in --out from its last checkpoint", False)
    warmup_steps: int | None = setting("linear warmup steps (default: 3%% of the steps)", valid=NOT_NEGATIVE)
    schedule: str = setting("learning-rate schedule after the warmup", "cosine", choices=("cosine", "constant"))
    weight_decay: float = setting("on matrices only (not norms, biases, embeddings); with --lr, a step shrinks the "
                                  "weights by lr x weight_decay, which must stay below 1", 0.01, valid=DECAY)
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
        if filled.source and local_path(filled.source):      # stored resolved: the same file from any folder
            filled.source = str(Path(filled.source).resolve())
        if filled.micro_batch_tokens > filled.batch_tokens:
            raise ConfigError(f"--micro-batch-tokens {filled.micro_batch_tokens} exceeds --batch-tokens "
                              f"{filled.batch_tokens}: it must be at most --batch-tokens")
        if filled.lr * filled.weight_decay >= 1:
            raise ConfigError(f"--weight-decay {filled.weight_decay} with --lr {filled.lr} shrinks every matrix by "
                              f"lr x weight_decay = {filled.lr * filled.weight_decay:.3g} of itself a step: keep "
                              "--weight-decay below 1 / --lr (0.01-0.1 is usual)")
        return filled


FIELDS = {spec.name: spec for spec in fields(TrainConfig)}
# What a resumed run may change: how often it reports and saves, where it runs. Everything else
# gives the run its meaning and must match the saved configuration (epochs may grow).
# The source may be named by another path: what must match is the poems' fingerprint (poems_sha256).
FREE_ON_RESUME = {"eval_every", "checkpoint_every", "log_every", "keep_checkpoints", "device", "out", "resume",
                  "source"}


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


def add_flags(parser: argparse.ArgumentParser, names=None, defaults=None, given_only: bool = False) -> None:
    """One flag per TrainConfig field (or the named ones); `defaults` overrides a field's default.
    given_only: every flag's value is None unless given (the help still names the default), so that
    from_flags knows what the user said: a --resume takes the rest from the run."""
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
        value = None if given_only else default
        if isinstance(default, bool):
            parser.add_argument(flag(name), action="store_true", default=value, help=text)
        elif isinstance(default, tuple):
            parser.add_argument(flag(name), type=float, nargs=len(default), default=value, metavar="B", help=text)
        else:
            parser.add_argument(flag(name), type={"int": int, "float": float}.get(spec.type.split()[0], str),
                                default=value, choices=meta.get("choices"),
                                required=spec.default is MISSING and not given_only, help=text)


def given_flags(args: argparse.Namespace) -> dict:
    """The TrainConfig fields the user gave (add_flags(given_only=True) leaves the others None)."""
    return {name: tuple(value) if isinstance(value, list) else value for name, value in vars(args).items()
            if name in FIELDS and value is not None}


def read_config_file(path) -> dict:
    """TrainConfig fields from a .json, .yaml/.yml or .toml file; a run's own config.json is such a file
    (its resume flag and poem fingerprint describe that run, not the next: they are left out)."""
    path, suffix = Path(path), Path(path).suffix.lower()
    kinds = {".json": "JSON", ".yaml": "YAML", ".yml": "YAML", ".toml": "TOML"}
    if suffix not in kinds:
        raise ConfigError(f"--config {path}: use a .json, .yaml (.yml) or .toml file of memorize's settings")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except ImportError as e:
        raise ConfigError(f"--config {path}: reading {kinds[suffix]} needs {e.name} (Python 3.11+ for TOML): use a "
                          ".json file") from None
    except Exception as e:
        raise ConfigError(f"--config {path} is not valid {kinds[suffix]} ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} holds no settings: expected keys such as model, lang, poems, epochs")
    unknown = sorted(set(data) - FIELDS.keys() - {"poems_sha256"})
    if unknown:
        raise ConfigError(f"--config {path}: {', '.join(unknown)} {'is not a setting' if len(unknown) == 1 else 'are not settings'}"
                          f" of memorize (see python cli.py memorize --help)")
    settings = {name: tuple(value) if isinstance(value, list) else value for name, value in data.items()
                if name in FIELDS and name != "resume" and value is not None}
    for name, value in settings.items():
        check_value(name, value)
    return settings


def from_flags(args: argparse.Namespace) -> TrainConfig:
    """The run the flags ask for: the --config file's settings, the flags given over them. With --resume,
    the run's own settings, the given flags checked against them (resumed_config); else TrainConfig's
    defaults for what was not given."""
    given = {**(read_config_file(args.config) if getattr(args, "config", None) else {}), **given_flags(args)}
    if given.get("resume"):
        return resumed_config(given)
    if "model" not in given:
        raise ConfigError("--model is required: a registry name (qwen2-0.5b, tiny-qwen2, ...) or a model folder "
                          "(or --resume --out RUN to continue a run)")
    return TrainConfig(**given)


def resumed_config(given: dict) -> TrainConfig:
    """--resume needs only --out: the run's settings (config.json, or its newest checkpoint's copy) with
    the given flags, each of which must match the run's except FREE_ON_RESUME and a larger --epochs."""
    out = given.get("out")
    if out is None and "model" in given:
        out = str(run_dir("runs", given["model"], given.get("lang", "cn"), given.get("length", 256)))
    if out is None:
        raise ConfigError("--resume needs --out: the folder of the run to continue")
    saved = run_settings(out)
    if saved is None:
        raise ConfigError(f"--resume: {out} holds no run to continue (no config.json, no checkpoint): check --out, "
                          "or leave out --resume to start a run there")
    settings = {name: tuple(value) if isinstance(value, list) else value for name, value in saved.items()
                if name in FIELDS}
    differences = [f"{flag(name)} {shown(value)} (the run: {shown(settings.get(name))})"
                   for name, value in given.items() if name not in FREE_ON_RESUME and value != settings.get(name)
                   and not (name == "epochs" and value > settings.get(name, value))]
    if differences:
        raise ConfigError(f"--resume: {out} was trained with other settings: {'; '.join(differences)}. A resume "
                          "takes the run's own settings (only --out is needed), or start a new run with another --out")
    return TrainConfig(**{**settings, **given, "out": out, "resume": True})


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


def train_step(model, opt: AdamW, micro_batches: list[PackedBatch], n_targets: int, device, max_grad_norm: float,
               world: int = 1):
    """Forward/backward over this rank's micro-batches of the step (under FSDP2 each backward
    reduce-scatters its gradients into the fp32 shards), clip, AdamW (which consumes the gradients).
    Returns (summed loss of the step over all ranks as a device tensor, grad norm as a device tensor)."""
    loss_sum = torch.zeros((), device=device)
    for batch in micro_batches:
        batch = batch.to(device, non_blocking=True)
        loss = model.loss(batch.input_ids, batch.shifted_labels(), batch.cu_seqlens, batch.position_ids,
                          batch.max_seqlen, reduction="sum", target_rows=batch.target_rows) / n_targets
        loss.backward()
        loss_sum += loss.detach()
    if world > 1:
        dist.all_reduce(loss_sum)
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
    model: object                     # under FSDP2 (several ranks) the sharded fp32 model
    dtype: torch.dtype                # what the forward and backward compute in (and model/ is saved in)
    tokenizer: object
    fmt: str
    poems: list
    examples: list
    opt: AdamW
    names: list                       # the optimizer's parameter names per group (its state's keys)
    total_steps: int
    warmup_steps: int
    fingerprint: str                  # the training poems' (engine.data.fingerprint): what a resume must train on
    epoch: int = 0                    # epochs done
    step: int = 0                     # optimizer steps done
    totals: dict = field(default_factory=lambda: {"train_seconds": 0.0, "train_tokens": 0, "eval_seconds": 0.0})
    last_eval: tuple | None = None    # (summary, records) of the latest recitation evaluation; (None, None) off rank 0
    rank_tokens: int = 0              # tokens this rank trained on since this process started
    base_bits: list | None = None     # each poem's target NLL in bits under the base model (rank 0)
    last_bits: list | None = None     # the same at the latest evaluation (rank 0)
    console: Console = field(default_factory=lambda: Console(None, enabled=False))   # rank 0's lines and train.log
    started: str = field(default_factory=now)
    last_loss: float | None = None    # the latest logged loss, shown on the progress bar
    eval_durations: list = field(default_factory=list)     # seconds of each evaluation (with scoring) so far
    first_step: int = 0               # the step this process started at (after a resume: the checkpoint's)
    train_seconds_here: float = 0.0   # training seconds of the epochs this process finished (the ETA's rate) ...
    steps_timed: int = 0              # ... and their steps

    def due(self, every: int) -> bool:
        """Is the epoch just finished one of every `every`-th, or the last? (every 0: never)"""
        return self.due_at(self.epoch, every)

    def due_at(self, epoch: int, every: int) -> bool:
        return every > 0 and (epoch % every == 0 or epoch == self.config.epochs)

    def log(self, **record) -> None:
        """A metrics.jsonl line, and the same in train.log (rank 0 writes them)."""
        if self.rank == 0:
            append_jsonl(self.out / "metrics.jsonl", [record])
            self.console.metrics(record)


def memorize(config: TrainConfig, progress: bool = True) -> dict:
    """Train, evaluate and write the run's folder; returns results.json's content (rank 0)."""
    config = config.resolved()
    with distributed(config.device) as (rank, world, device):
        return memorize_rank(config, rank, world, device, progress)


def memorize_rank(config: TrainConfig, rank: int, world: int, device: str, progress: bool) -> dict:
    """memorize() in one of `world` processes; rank 0 writes the run's files and returns the results."""
    out = Path(config.out)
    with claimed(out, lambda folder: check_output(folder, config.resume)) if rank == 0 else contextlib.nullcontext():
        saved = check_resume(config) if rank == 0 and config.resume else None
        run = setup(config, rank, world, device)
        if saved and saved.get("poems_sha256") not in (None, run.fingerprint):
            raise TrainingError(f"--resume: the training poems differ from the ones {out} was trained on (their "
                                f"fingerprint {run.fingerprint[:12]}, the run's {saved['poems_sha256'][:12]}): the "
                                f"source {config.source or 'frozen set'} changed since. Resume with the run's own poems, "
                                "or start a new run with another --out")
        run.console = Console(out / "train.log", enabled=rank == 0)
        with cpu_threads(run.device, run.model.num_parameters()):
            run.console.say(start_summary(run))
            with gathered(run.model) as whole:
                if rank == 0:                  # before resume() loads trained weights
                    run.base_bits = score(run, whole)
                    run.console.say(f"base model: {sum(run.base_bits) / 1000:,.1f} kbit of target information in "
                                    f"the poems (scored in {duration(run.totals['score_seconds'])})")
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
            state_bytes = all_gather(run.opt.resident_bytes(), world)
            with gathered(run.model) as whole:
                return finish(run, whole, tokens_per_rank, state_bytes) if rank == 0 else {}


def train(run: Run, progress: bool) -> None:
    """The epochs left: each trained, evaluated every eval_every and checkpointed every checkpoint_every.
    Evaluations are a phase of their own: a line before and after each, outside the training bar."""
    config = run.config
    desc = f"{Path(config.model).name} {config.lang}-{config.length} seed {config.seed}"
    with run.console.progress(run.total_steps, run.step, desc, show=progress) as bar:
        while run.epoch < config.epochs:
            show_progress(run, bar)
            record = train_epoch(run, bar)
            if run.due(config.eval_every):
                run.console.say(f"epoch {run.epoch}/{config.epochs}: reciting {len(run.poems)} poems ...")
                summary = recite(run)          # every rank evaluates its share
                if run.rank == 0:
                    record.update(accuracy=summary["accuracy"], bits=summary["bits"],
                                  bits_gained=sum(run.base_bits) - summary["bits"])
                    run.console.say(f"epoch {run.epoch}/{config.epochs}: {summary['correct']}/{summary['n']} recited "
                                    f"exactly ({100 * summary['accuracy']:.2f}%), loss {record['epoch_loss']:.4f}, "
                                    f"{record['bits_gained'] / 1000:,.1f} kbit gained "
                                    f"({duration(run.eval_durations[-1])})")
            run.log(**record)
            if run.due(config.checkpoint_every):
                with gathered(run.model) as whole:
                    save_checkpoint(run.out, whole, run.tokenizer, run.opt.state_dict(run.names),
                                    run.epoch, run.step, run.totals, saved_run_config(run), config.keep_checkpoints,
                                    run.rank)
                run.console.say(f"epoch {run.epoch}/{config.epochs}: checkpoint {run.out / f'checkpoint-{run.epoch}'}")
            if run.world > 1:
                dist.barrier()
        show_progress(run, bar)


def show_progress(run: Run, bar) -> None:
    """The bar's postfix: the epoch under way, the latest loss, and an ETA that counts the evaluations
    still to come at the mean duration of those done (the bar's own rate sees training steps only)."""
    config = run.config
    parts = [f"epoch {min(run.epoch + 1, config.epochs)}/{config.epochs}"]
    if run.last_loss is not None:
        parts.append(f"loss {run.last_loss:.4f}")
    if run.steps_timed > 0 and run.step < run.total_steps:       # after this process's first epoch
        per_step = run.train_seconds_here / run.steps_timed
        evals_left = sum(run.due_at(epoch, config.eval_every) for epoch in range(run.epoch + 1, config.epochs + 1))
        per_eval = sum(run.eval_durations) / len(run.eval_durations) if run.eval_durations else None
        left = (run.total_steps - run.step) * per_step + evals_left * (per_eval or 0)
        parts.append(f"eta {duration(left)}" + ("+evals" if evals_left and per_eval is None else ""))
    bar.set_postfix_str(", ".join(parts))


def differing_settings(config: TrainConfig, saved: dict) -> list[tuple[str, object, object]]:
    """(name, config's value, the run's) for each setting that gives a run its meaning (FREE_ON_RESUME aside;
    a format left to the model's default matches any) in which a run's saved settings differ from config."""
    wanted = json.loads(json.dumps(asdict(config)))      # tuples as lists, as in config.json
    return [(name, value, saved.get(name)) for name, value in wanted.items()
            if name not in FREE_ON_RESUME and value != saved.get(name) and not (name == "format" and value is None)]


def difference_text(name: str, value, old) -> str:
    return f"{flag(name)} {shown(value)} (the run: {shown(old)})"


def check_resume(config: TrainConfig) -> dict | None:
    """Refuse a resume that would change the run's meaning; say so when it extends the run. Returns the
    run's saved settings (config.json, or its newest checkpoint's copy)."""
    saved = run_settings(config.out)
    if saved is None:
        return None
    differences = [difference_text(*found) for found in differing_settings(config, saved)
                   if not (found[0] == "epochs" and found[1] > found[2])]      # epochs may grow: the run is extended
    if differences:
        raise TrainingError(f"--resume: {config.out} was trained with other settings: {'; '.join(differences)}. "
                            "Resume with the run's own settings, or start a new run with another --out")
    if config.epochs > saved["epochs"]:
        print(f"extending the run in {config.out} from {saved['epochs']} to {config.epochs} epochs (the learning-rate "
              "schedule stretches to the new length)", file=sys.stderr)
    return saved


def setup(config: TrainConfig, rank: int, world: int, device: str) -> Run:
    """Seed every generator, load the model, the poems and the optimizer."""
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    tokenizer = load_tokenizer(config.model)
    fmt = config.format or model_format(config.model, tokenizer)
    poems = load_poems(config.lang, config.length, config.poems, config.seed, config.source)
    examples = encode_examples(poems, tokenizer, config.lang, fmt, max_tokens=config.micro_batch_tokens)
    steps_per_epoch = len(plan_steps(pack(examples, config.micro_batch_tokens, config.seed, 0), config.batch_tokens))
    total_steps = steps_per_epoch * config.epochs
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, round(0.03 * total_steps))
    if warmup > total_steps:
        raise ConfigError(f"--warmup-steps {warmup} is longer than the run ({total_steps} steps): the learning "
                          f"rate would never reach --lr; use fewer (the default, 3%, is {max(1, round(0.03 * total_steps))})")
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    # several ranks: loaded in fp32 as this rank's shards, which are the master weights (FSDP2 computes in dtype)
    shard = (lambda model: shard_model(model, world, dtype, device)) if world > 1 else None
    model = load_model(config.model, device=device, seed=config.seed, dtype=torch.float32 if world > 1 else dtype,
                       shard=shard)
    check_vocabulary(examples, tokenizer, model.config.vocab_size, config.model)
    opt = AdamW(parameter_groups(model, config.weight_decay), lr=config.lr, betas=config.betas,
                weight_decay=config.weight_decay)
    return Run(config, Path(config.out), rank, world, device, model, dtype, tokenizer, fmt, poems, examples, opt,
               model_names(model, opt), total_steps, warmup, fingerprint(poems))


def checkpoint_bytes(run: Run) -> int:
    """One checkpoint's size: the model in its dtype (model/), the fp32 master weights and both moments (state/)."""
    return run.model.num_parameters() * (run.dtype.itemsize + 12)


def start_summary(run: Run) -> str:
    """What the run is, where its inputs come from and its outputs go, and what it will cost in steps and disk."""
    config, model = run.config, run.model
    folder, spec = resolve_model(config.model)
    weights = (f"{folder}" if folder else f"random init of the preset (seed {config.seed})") + \
              (f", hub {spec.repo}" if spec and spec.repo else "")
    steps_per_epoch = run.total_steps // config.epochs
    saved = checkpoint_bytes(run)
    keeping = (f"a checkpoint every {config.checkpoint_every} epochs, {size(saved)} each, the newest "
               f"{config.keep_checkpoints} kept (~{size(saved * min(config.keep_checkpoints, config.epochs))})"
               if config.checkpoint_every else "no mid-run checkpoints (--checkpoint-every 0): a kill loses the run")
    threads = torch.get_num_threads()
    threads = f", {threads} thread{'s' * (threads != 1)}" if run.device == "cpu" else ""
    return "\n".join([
        f"run: {config.model} ({model.num_parameters() / 1e6:,.1f}M parameters, {str(run.dtype).removeprefix('torch.')}) "
        f"memorizes {len(run.poems)} {config.lang}-{config.length} poems in the {run.fmt} format, seed {config.seed}",
        f"weights: {weights}",
        f"poems: {config.source or 'the frozen CN set (data/)'}, fingerprint {run.fingerprint[:12]}",
        f"steps: {config.epochs} epochs x {steps_per_epoch} = {run.total_steps} steps of <= {config.batch_tokens} "
        f"tokens, lr {config.lr:g} ({config.schedule}, {run.warmup_steps} warmup), evaluation every "
        f"{config.eval_every} epochs",
        f"device: {run.device}{threads}" + (f", {run.world} processes (FSDP2: each holds 1/{run.world} of the "
                                            "weights, gradients and optimizer state)" if run.world > 1 else ""),
        f"out: {run.out} (log: train.log); {keeping}"])


def check_vocabulary(examples, tokenizer, vocab_size: int, model: str) -> None:
    """Every token id the poems and the stop tokens use has an embedding row (else an IndexError mid-run)."""
    largest = max([max(example.input_ids) for example in examples] + list(tokenizer.eos_token_ids))
    if largest >= vocab_size:
        raise ConfigError(f"the tokenizer of {model} gives token id {largest}, but the model has {vocab_size} "
                          "embeddings: its tokenizer files and config.json come from different checkpoints; put "
                          "the model's own tokenizer.json and tokenizer_config.json in the folder")


def resume(run: Run) -> Path | None:
    """With --resume: the newest readable checkpoint's weights, optimizer, RNG and progress; writes
    config.json. Returns the checkpoint resumed from, if any."""
    checkpoint = None
    if run.config.resume:
        checkpoint, state = restore_newest(run.out, run.opt, run.names)
        if checkpoint is not None:
            run.epoch, run.step, run.totals = state
            run.first_step = run.step
    if run.rank == 0:
        write_json(run.out / "config.json", saved_run_config(run))
        if checkpoint is not None:
            run.console.say(f"resuming {run.out} after epoch {run.epoch} (step {run.step})")
        elif run.config.resume:
            run.console.say(f"{run.out} holds no checkpoint yet: the run starts from the beginning")
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
            loss, norm = train_step(run.model, run.opt, mine, n_targets, run.device, config.max_grad_norm, run.world)
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
            run.last_loss = loss_value
            show_progress(run, bar)
            window_tokens, window_start = 0, now
    epoch_loss = _finite(torch.stack(losses).mean(), run)
    elapsed = time.perf_counter() - start
    epoch_tokens = sum(len(example) for example in run.examples)
    run.totals["train_seconds"] += elapsed
    run.train_seconds_here += elapsed
    run.steps_timed += len(losses)
    run.totals["train_tokens"] += epoch_tokens
    run.epoch += 1
    return {"epoch": run.epoch, "step": run.step, "epoch_loss": epoch_loss, "epoch_seconds": elapsed,
            "epoch_tokens_per_second": epoch_tokens / elapsed}


def recite(run: Run) -> dict | None:
    """The recitation evaluation, sharded over the ranks (every rank must call it; rank 0 gets the
    summary, the others None), its speed fields renamed so they don't read as training speed; on
    rank 0 the poems' bits under the model too, and each poem's result appended to evals.jsonl."""
    start = time.perf_counter()
    with gathered(run.model) as whole:
        summary, records = evaluate_sharded(whole, run.tokenizer, run.poems, run.config.lang, run.fmt, run.world,
                                            run.rank)
        run.totals["eval_seconds"] += time.perf_counter() - start
        if summary is not None:
            run.last_bits = score(run, whole)
    run.model.train()
    run.last_eval = summary, records
    if summary is not None:
        summary["eval_tokens_per_second"] = summary.pop("tokens_per_second")
        summary["last_eval_seconds"] = summary.pop("eval_seconds")
        summary["bits"] = sum(run.last_bits)
        append_jsonl(run.out / EVALS_FILE, eval_lines(run.epoch, records, run.last_bits))
    run.eval_durations.append(time.perf_counter() - start)
    return summary


def score(run: Run, model) -> list[float]:
    """Each training poem's target NLL in bits under `model` (the run's, gathered), timed (engine/scoring.py)."""
    start = time.perf_counter()
    # forward only, nothing kept for backward: batches larger than training's cost no more memory
    bits = poem_bits(model, run.examples, max(run.config.micro_batch_tokens, SCORE_BATCH_TOKENS))
    run.totals["score_seconds"] = run.totals.get("score_seconds", 0.0) + time.perf_counter() - start
    return bits


def finish(run: Run, whole, tokens_per_rank: list[int], state_bytes_per_rank: list[int]) -> dict:
    """The final model (`whole`: the run's, gathered), results.json and the run's report; returns
    results.json's content."""
    summary, records = run.last_eval
    for record, base, trained in zip(records, run.base_bits, run.last_bits):
        record.update(base_bits=round(base, 4), bits=round(trained, 4))
    config, totals = run.config, run.totals
    with written_whole(run.out / "model", f"the final model {run.out / 'model'}",
                       "the last checkpoint is intact" if config.checkpoint_every else
                       "no checkpoint was kept: --checkpoint-every 0") as tmp:
        whole.save_pretrained(tmp, run.tokenizer)
        write_json(tmp / TRAINING_FILE, training_record(saved_run_config(run)))
    results = {
        "model": config.model, "lang": config.lang, "length": config.length, "n_poems": len(run.poems),
        "epochs": config.epochs, **summary, **totals,
        "tokens_per_second": totals["train_tokens"] / totals["train_seconds"] if totals["train_seconds"] else None,
        "peak_memory_bytes": peak_memory_bytes(run.device), "parameters": run.model.num_parameters(),
        "device": torch.cuda.get_device_name(run.device) if run.device.startswith("cuda") else "cpu",
        "world_size": run.world, "train_tokens_per_rank": tokens_per_rank,
        # weights, gradients, masters and moments each rank held (measured from the tensors: 1/N each under FSDP2)
        "state_bytes_per_rank": state_bytes_per_rank, "config": saved_run_config(run),
        "memorization": {**bits_summary(run.base_bits, run.last_bits, run.model.num_parameters(), summary["correct"]),
                         "target_tokens": sum(len(example.target_ids) for example in run.examples)},
        "dynamics": dynamics_summary(read_jsonl(run.out / EVALS_FILE)),
        "provenance": {**provenance(model_source(config.model, *source_of(config.model)), run.device),
                       "poems_sha256": run.fingerprint, "started": run.started, "ended": now(),
                       "resumed": run.first_step > 0},
    }
    write_run_report(run.out, results, records)
    model_bytes = sum(path.stat().st_size for path in (run.out / "model").iterdir())
    run.console.say(f"done: {summary['correct']}/{summary['n']} poems recited exactly ({100 * summary['accuracy']:.2f}%) "
                    f"after {config.epochs} epochs; {duration(totals['train_seconds'])} training, "
                    f"{duration(totals['eval_seconds'])} evaluation, {duration(totals.get('score_seconds', 0))} scoring")
    run.console.say(f"wrote {run.out}: model/ ({size(model_bytes)}, {str(run.dtype).removeprefix('torch.')}), "
                    "report.md, results.json, train.log" + ("" if config.checkpoint_every else
                                                            " (no checkpoints: --checkpoint-every 0)"))
    return results


def source_of(model: str) -> tuple[Path | None, str | None]:
    """(the folder the weights were read from or None for a preset, the hub repository or None)."""
    folder, spec = resolve_model(model)
    return folder, spec.repo if spec else None


def saved_run_config(run: Run) -> dict:
    """config.json: the resolved settings, the prompt format used and the training poems' fingerprint."""
    return {**asdict(run.config), "format": run.fmt, "poems_sha256": run.fingerprint}


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

