"""A run's folder on disk: its name, its lock, its checkpoints, its metrics.jsonl, the finished runs.

    runs/MODEL-LANG-LENGTH/
        .lock  config.json  metrics.jsonl  latest  checkpoint-EPOCH/{state/, model/, trainer.pt}  (the last two)
        results.json  generations.jsonl  report.md  curve.png  model/      (once finished)

A run holds an OS lock (flock) on .lock for its whole life, so a second run on the folder is
refused; the kernel drops the lock when the process dies, so a killed run leaves no stale lock.
A checkpoint is written into a hidden temporary folder, renamed into place, and only then named
by the `latest` pointer (itself replaced atomically), so a kill at any moment leaves either the
previous checkpoint or the new one, never half of one; the one before stays as a fallback for a
checkpoint that a failing disk corrupted later.

A checkpoint's state/ is a torch.distributed.checkpoint (DCP) folder of the optimizer's tensors by
parameter name: the fp32 master weights and both AdamW moments, each rank writing its own shards, so
a run saved on N ranks resumes on M (DCP reshards on load) and, where N == M, bit for bit. model/ is
the gathered model in Hugging Face's format (for eval, a seed, the finite-weights check); trainer.pt
the progress, the optimizer's scalars, the RNG and the run's settings, written last.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from models.weights import atomic_write, checkpoint_files, iter_tensors

LOCK = ".lock"
OURS = {LOCK, "memorize.log", "train.log"}    # what a sweep, a lock or the log puts into a folder first
MODEL_FILES = {"config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json"}


TRAINING_FILE = "training.json"       # in a model/ folder the engine saved: training_record()
TRAINING_KEYS = ("model", "format", "lang", "length", "poems", "seed", "source", "poems_sha256", "epochs", "out")


class TrainingError(RuntimeError):
    pass


def run_dir(root, model: str, lang: str, length: int) -> Path:
    """runs/{model}-{lang}-{length}: a model folder is named by its last component."""
    return Path(root) / f"{Path(model).name}-{lang}-{length}"


# ---------------------------------------------------------------- what a folder holds

def saved_config(folder) -> dict | None:
    """The run configuration memorize wrote into `folder` (its config.json), None if it holds none."""
    try:
        saved = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and "epochs" in saved and "model_type" not in saved else None


def run_settings(folder) -> dict | None:
    """The run's settings: its config.json, else (deleted or damaged) those its newest readable
    checkpoint keeps; None when the folder holds neither."""
    saved = saved_config(folder)
    for checkpoint in [] if saved is not None else resume_candidates(Path(folder)):
        try:
            saved = torch.load(checkpoint / "trainer.pt", map_location="cpu", weights_only=False, mmap=True)["config"]
            saved = json.loads(json.dumps(saved))          # tuples as lists, as config.json has them
            break
        except Exception:
            continue
    return saved


def is_run_folder(folder) -> bool:
    folder = Path(folder)
    return (folder / "latest").is_file() or (folder / "metrics.jsonl").is_file() or saved_config(folder) is not None


def folder_kind(folder: Path) -> str:
    """new, empty, run, model, eval, file or other."""
    if not folder.exists():
        return "new"
    if not folder.is_dir():
        return "file"
    names = {path.name for path in folder.iterdir()} - OURS
    if not names:
        return "empty"
    if is_run_folder(folder):
        return "run"
    return "model" if names & MODEL_FILES else "eval" if "results.json" in names else "other"


REFUSED = {"file": "is a file", "model": "is a model folder", "eval": "holds an evaluation (results.json)",
           "other": "is not empty and holds no run"}


def refuse_foreign(out: Path) -> str:
    """memorize writes only into a new or empty folder, or into its own run's folder; returns its kind."""
    kind = folder_kind(out)
    if kind in REFUSED:
        raise TrainingError(f"{out} {REFUSED[kind]}: memorize writes only into a new or empty folder (or continues "
                            "its own run there with --resume): pass another --out")
    return kind


def check_output(out: Path, resume: bool) -> None:
    kind = refuse_foreign(out)
    if resume and kind != "run":
        raise TrainingError(f"--resume: {out} holds no run to continue: leave out --resume to start one there")
    if not resume and kind == "run":
        raise TrainingError(f"{out} already holds a run: pass --resume to continue it, or another --out")


def check_eval_output(out: Path, overwrite: bool) -> None:
    """eval writes into a new or empty folder, or over its own earlier results with --overwrite."""
    kind = folder_kind(out)
    if kind == "eval" and not overwrite:
        raise TrainingError(f"{out} holds an earlier evaluation: pass --overwrite to replace it, or another --out")
    if kind not in ("new", "empty", "eval"):
        raise TrainingError(f"{out} {REFUSED.get(kind, 'holds a memorize run')}: eval writes only into a new or empty "
                            "folder (or over its own results with --overwrite): pass another --out")


def leave_nothing(out: Path, created: bool) -> None:
    """After a failed command: the folder it created is removed unless a checkpoint was written into it
    (which --resume continues)."""
    if created and not checkpoints(out):
        shutil.rmtree(out, ignore_errors=True)


@contextlib.contextmanager
def claimed(out: Path, check):
    """Check the folder (check(out) raises what a command must not write into), create it, and hold its
    lock while the block runs, checking again under the lock; a failed command that had not written a
    checkpoint into a folder it created leaves nothing behind. memorize and eval share the lock: neither
    writes into a folder the other is writing."""
    check(out)                         # before the lock file is written into the folder
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / LOCK, "a+")
    except OSError as e:
        raise TrainingError(f"cannot write to the output directory {out} ({e.strerror}): pass --out with a "
                            "writable folder") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise TrainingError(f"{out} is in use by another run or evaluation (PID {holder}): wait for it to end, or "
                            "pass another --out") from None
    try:
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        check(out)                     # under the lock: no other command changes the folder meanwhile
        yield
    except BaseException:
        leave_nothing(out, created)
        raise
    finally:
        lock.close()                   # closing the file releases the lock


# ---------------------------------------------------------------- checkpoints

STATE_TENSORS = ("weights", "exp_avg", "exp_avg_sq")     # the optimizer state's tensors, saved in state/ (DCP)


def save_checkpoint(out: Path, whole, tokenizer, optimizer_state: dict, epoch: int, step: int, totals: dict,
                    settings: dict, keep: int = 2, rank: int = 0) -> None:
    """checkpoint-{epoch}/ (state/, model/, trainer.pt; the run's settings in the last two), then the
    `latest` pointer swapped atomically; the `keep` newest checkpoints up to this one stay, older (and
    stale newer) ones go. Every rank calls it: each writes its shards of optimizer_state
    (AdamW.state_dict) into state/; rank 0, holding `whole` (the gathered model), writes the rest."""
    final = out / f"checkpoint-{epoch}"
    with written_whole(final, f"the checkpoint {final}", "earlier checkpoints are intact", rank) as tmp:
        with one_process_quiet():
            dcp.save({key: optimizer_state[key] for key in STATE_TENSORS}, checkpoint_id=tmp / "state",
                     no_dist=not dist.is_initialized())
        if rank == 0:
            whole.save_pretrained(tmp / "model", tokenizer)
            write_json(tmp / "model" / TRAINING_FILE, training_record(settings))
            scalars = {key: value for key, value in optimizer_state.items() if key not in STATE_TENSORS}
            torch.save({"optimizer": scalars, "epoch": epoch, "step": step, "totals": totals, "config": settings,
                        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                                "numpy": np.random.get_state(), "cuda": torch.cuda.get_rng_state_all()
                                if torch.cuda.is_available() else None}},
                       tmp / "trainer.pt")
    if rank == 0:
        point_latest(out, final)
        kept = [path for path in checkpoints(out) if _epoch(path) <= epoch][:keep]
        for old in out.glob("checkpoint-*"):
            if old not in kept:
                shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()             # the checkpoint is whole for every rank when this returns


def first_failure(error: BaseException) -> Exception:
    """The error itself, or under DCP's CheckpointException (which holds each failed rank's) the first rank's.
    A wrapped interruption (Ctrl-C inside DCP's save or load) is raised again: it is not a failure to read
    or write the checkpoint."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        return first_failure(next(iter(failures.values()))[0])
    if not isinstance(error, Exception):
        raise error from None
    return error


@contextlib.contextmanager
def one_process_quiet():
    """DCP in one process warns that torch.distributed is uninitialized, which is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


@contextlib.contextmanager
def written_whole(final: Path, what: str, intact: str, rank: int | None = None):
    """Yields a hidden temporary folder beside `final` to write into; renamed to `final` when the block
    ends. Any failure on the way (a full disk shows as OSError, SafetensorError or torch's 'unexpected
    pos') removes the temporary folder and becomes one TrainingError saying what to do. With `rank`,
    every rank of the run writes into the folder: rank 0 makes it and renames it, the others wait for it."""
    tmp = final.with_name(f".{final.name}.tmp")
    making = rank in (None, 0)
    try:
        if making:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if rank is not None and dist.is_initialized():
            dist.barrier()
        yield tmp
        if making:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    except (Exception, dcp.CheckpointException) as e:     # the latter: a BaseException
        if making:
            shutil.rmtree(tmp, ignore_errors=True)
        e = first_failure(e)
        reason = getattr(e, "strerror", None) or f"{type(e).__name__}: {e}"
        raise TrainingError(f"cannot write {what} ({reason}): free disk space or fix the permissions of "
                            f"{final.parent}, then continue with --resume ({intact})") from None


def training_record(settings: dict) -> dict:
    """What a saved model/ folder says of its training (TRAINING_FILE): the format it learned its prompts
    in and the poems it learned, so that `cli.py eval` of a copied model/ evaluates what it was trained on."""
    return {key: settings.get(key) for key in TRAINING_KEYS}


def point_latest(out: Path, checkpoint: Path) -> None:
    pointer = out / ".latest.tmp"
    pointer.write_text(checkpoint.name)
    os.replace(pointer, out / "latest")


def _epoch(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def checkpoints(out) -> list[Path]:
    """The complete checkpoint folders (a temporary one is not), newest first."""
    found = [path for path in Path(out).glob("checkpoint-*") if path.is_dir() and path.name.split("-")[1].isdigit()]
    return sorted(found, key=_epoch, reverse=True)


def resume_candidates(out: Path) -> list[Path]:
    """The checkpoint `latest` names, then the older complete ones, newest first."""
    found, pointer = checkpoints(out), out / "latest"
    if not pointer.is_file():
        return found
    named = pointer.read_text().strip()
    if out / named in found:
        return [out / named] + [path for path in found if _epoch(path) < _epoch(out / named)]
    print(f"warning: {pointer} names no checkpoint folder ({named!r}): trying the newest complete checkpoint instead",
          file=sys.stderr)
    return found


def restore_newest(out: Path, opt, names) -> tuple[Path | None, tuple]:
    """Restore the newest readable checkpoint, naming any that failed and the one used instead.
    (None, ()) when the folder has no checkpoint; TrainingError when none can be read. Every rank calls it."""
    failures = []
    for checkpoint in resume_candidates(out):
        try:
            state = restore(checkpoint, opt, names)
        except TrainingError as e:
            failures.append(str(e))
            print(f"warning: {e}", file=sys.stderr)
            continue
        if failures:
            print(f"resuming from {checkpoint} instead", file=sys.stderr)
        return checkpoint, state
    if failures:
        raise TrainingError(f"no checkpoint in {out} can be read ({'; '.join(failures)}): start the run again in "
                            "a new --out")
    return None, ()


def restore(checkpoint: Path, opt, names) -> tuple[int, int, dict]:
    """Load the optimizer's state (master weights, moments; the model's weights follow from the masters)
    and the RNG; returns (epochs done, steps done, running totals). names: engine.optim.model_names.
    TrainingError names the file that cannot be read."""
    try:
        state = torch.load(checkpoint / "trainer.pt", map_location="cpu", weights_only=False)
    except Exception as e:
        raise TrainingError(f"cannot read {checkpoint / 'trainer.pt'} ({type(e).__name__}: {e})") from None
    if not (checkpoint / "state").is_dir():
        raise TrainingError(f"{checkpoint} has no state/ folder: it was written by an engine before sharded "
                            "checkpoints (commit 036ce1b or older), which can resume it")
    live = opt.state_dict(names)
    tensors = {key: live[key] for key in STATE_TENSORS}
    try:
        with one_process_quiet():
            dcp.load(tensors, checkpoint_id=checkpoint / "state", no_dist=not dist.is_initialized())   # in place
        opt.load_state_dict({**state["optimizer"], **tensors}, names)
    except (Exception, dcp.CheckpointException) as e:
        e = first_failure(e)
        raise TrainingError(f"cannot read {checkpoint / 'state'} ({type(e).__name__}: {e})") from None
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["epoch"], state["step"], state["totals"]


def finite_weights(checkpoint: Path) -> bool:
    try:
        return all(bool(torch.isfinite(tensor).all()) for path in checkpoint_files(checkpoint / "model")
                   for _, tensor in iter_tensors(path))
    except Exception:
        return False


def keep_last_finite(out: Path) -> Path | None:
    """After a divergence: the newest checkpoint whose weights are all finite becomes `latest`; newer
    ones (their weights already diverged) are removed. None when there is no such checkpoint."""
    for checkpoint in checkpoints(out):
        if finite_weights(checkpoint):
            point_latest(out, checkpoint)
            return checkpoint
        shutil.rmtree(checkpoint, ignore_errors=True)
    (out / "latest").unlink(missing_ok=True)
    return None


# ---------------------------------------------------------------- metrics and results

def write_text(path, text: str) -> None:
    """The one way the engine writes a text file (config, results, reports, jsonl rewrites): atomically."""
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path, data) -> None:
    write_text(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def parse_jsonl(text: str, path, what: str = "record",
                advice: str = "the file was damaged: remove that line (and any after it) and run again") -> list:
    """The records of a .jsonl text, one a line; ValueError naming the file and line that does not parse."""
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{path}, line {number}: not a JSON {what} ({e}); {advice}") from None
    return records


def read_jsonl(path: Path) -> list[dict]:
    """A run's .jsonl file (metrics, evaluations, generations)."""
    return parse_jsonl(Path(path).read_text(encoding="utf-8"), path)


def append_jsonl(path: Path, records: list[dict]) -> None:
    """Appended, never rewritten: a kill loses at most the line being written, never one already there."""
    with Path(path).open("a", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


def keep_jsonl(path: Path, keep) -> None:
    """On resume: drop the records `keep(record)` refuses (those after the checkpoint, to be redone),
    rewriting the file atomically; no file, nothing to drop."""
    path = Path(path)
    if path.is_file():
        write_text(path, "".join(json.dumps(record) + "\n" for record in read_jsonl(path) if keep(record)))


RESULTS_KEYS = ("model", "lang", "length", "n_poems", "epochs", "accuracy", "train_seconds", "eval_seconds")


def find_runs(run_dirs=None, root="runs") -> list[dict]:
    """results.json of finished memorize runs (the given folders, each once, or every one under `root`:
    evaluations and other results there are not runs, and are passed over), with run_dir."""
    if run_dirs is not None:
        paths = [Path(d) / "results.json" for d in dict.fromkeys(str(Path(d).resolve()) for d in run_dirs)]
    else:
        paths = [path for path in sorted(Path(root).glob("**/results.json")) if is_run_folder(path.parent)]
    runs = []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path.parent} holds no results.json: it is not a finished memorize run")
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}): run the memorize run again with --resume, or leave "
                             "its folder out") from None
        if isinstance(results, dict) and results.get("command") == "eval":
            raise ValueError(f"{path.parent} holds an evaluation (cli.py eval), not a memorize run: leave it out")
        missing = [key for key in RESULTS_KEYS if not isinstance(results, dict) or key not in results]
        if missing:
            raise ValueError(f"{path} is not a finished memorize run's results (it has no {', '.join(missing)}): "
                             "pass the folders of finished memorize runs")
        runs.append({**results, "run_dir": str(path.parent)})
    return runs


def run_gpu_seconds(run: dict) -> float:
    """Device-seconds of a run: training, recitation evaluations and scoring (bits), on every device."""
    return (run["train_seconds"] + run["eval_seconds"] + run.get("score_seconds", 0.0)) * run.get("world_size", 1)
