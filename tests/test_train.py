"""The memorization run end to end on small CPU models: it memorizes, resumes exactly, scales out."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.dynamics import accuracy_curve
from engine.runs import read_jsonl
from engine.train import TrainConfig, TrainingError, memorize
from tests.helpers import rel_err, tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", hidden=128)


def config(model_dir, out, **overrides):
    base = dict(model=str(model_dir), poems=4, epochs=40, lr=3e-3, batch_tokens=128, eval_every=40, out=str(out),
                warmup_steps=5, log_every=1, checkpoint_every=1, format="plain")
    return TrainConfig(**{**base, **overrides})


def cli(*args):
    return [sys.executable, str(ROOT / "cli.py"), "memorize", *map(str, args)]


def test_a_short_run_memorizes_its_poems(model_dir, tmp_path):
    results = memorize(config(model_dir, tmp_path / "run"), progress=False)
    assert results["accuracy"] == 1.0, results
    out = tmp_path / "run"
    for name in ("results.json", "metrics.jsonl", "generations.jsonl", "curve.png", "report.md", "model/config.json",
                 "evals.jsonl", "bits.png", "accuracy_by_length_curve.png", "first_recited.png"):
        assert (out / name).is_file(), name
    generations = read_jsonl(out / "generations.jsonl")
    assert len(generations) == 4 and all(g["correct"] and g["output"] == g["target"] for g in generations)
    epochs = [m for m in read_jsonl(out / "metrics.jsonl") if "epoch_loss" in m]
    assert len(epochs) == 40 and epochs[-1]["epoch_loss"] < 0.1 * epochs[0]["epoch_loss"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["n_poems"] == 4 and saved["train_tokens"] > 0 and saved["config"]["lr"] == 3e-3
    assert "Wilson interval" in (out / "report.md").read_text() and "bits/parameter" in (out / "report.md").read_text()


def test_per_poem_records_and_bits_follow_the_run(model_dir, tmp_path):
    """evals.jsonl reproduces metrics.jsonl's accuracy curve exactly; bits fall from the base model's."""
    out = tmp_path / "run"
    results = memorize(config(model_dir, out, epochs=12, eval_every=3), progress=False)
    metrics = read_jsonl(out / "metrics.jsonl")
    evaluated = [m for m in metrics if "accuracy" in m]
    curve = accuracy_curve(read_jsonl(out / "evals.jsonl"))
    assert [(m["epoch"], m["accuracy"]) for m in curve] == [(m["epoch"], m["accuracy"]) for m in evaluated]
    assert [m["epoch"] for m in curve] == [3, 6, 9, 12] and all(m["n"] == 4 for m in curve)
    bits = results["memorization"]
    assert metrics[0] == {"epoch": 0, "step": 0, "bits": bits["base_bits"]}
    assert evaluated[-1]["bits"] == bits["trained_bits"] and 0 < bits["bits_gained"] <= bits["base_bits"]
    assert bits["bits_per_parameter"] == bits["bits_gained"] / results["parameters"]
    generations = read_jsonl(out / "generations.jsonl")
    assert sum(g["base_bits"] for g in generations) == pytest.approx(bits["base_bits"], abs=1e-3)
    assert results["dynamics"]["evaluations"] == 4 and results["score_seconds"] > 0
    assert results["interval"][0] <= results["accuracy"] <= results["interval"][1]


def test_cli_eval_writes_the_memorize_fields(model_dir, tmp_path, capsys):
    import cli
    assert cli.main(["eval", "--model", str(model_dir), "--lang", "cn", "--poems", "3", "--format", "plain",
                     "--out", str(tmp_path)]) == 0
    assert "of 3 poems" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"model", "lang", "length", "n_poems", "accuracy", "categories", "eval_seconds"} <= results.keys()
    assert len(read_jsonl(tmp_path / "generations.jsonl")) == 3


def run_args(model_dir, out, epochs):
    return cli("--model", model_dir, "--poems", 4, "--epochs", epochs, "--lr", "3e-3", "--batch-tokens", 128,
               "--eval-every", 100, "--checkpoint-every", 1, "--format", "plain", "--out", out)


ENV = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def uninterrupted(model_dir, tmp_path_factory):
    """The folder of an 8-epoch run that nothing interrupted."""
    out = tmp_path_factory.mktemp("whole") / "run"
    subprocess.run(run_args(model_dir, out, 8), env=ENV, check=True, capture_output=True)
    return out


def assert_same_weights(whole, folder):
    """folder's run ended as the uninterrupted one: the same final weights, every epoch once, the same evaluations."""
    want, got = (load_file(run / "model" / "model.safetensors") for run in (whole, folder))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    epochs = [m["epoch"] for m in read_jsonl(folder / "metrics.jsonl") if "epoch_loss" in m]
    assert epochs == list(range(1, 9))
    assert read_jsonl(folder / "evals.jsonl") == read_jsonl(whole / "evals.jsonl")


def test_kill_and_resume_gives_the_uninterrupted_weights(model_dir, tmp_path, uninterrupted):
    killed = subprocess.Popen(run_args(model_dir, tmp_path / "killed", 8), env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "latest").is_file() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done = int((tmp_path / "killed" / "latest").read_text().split("-")[1])
    assert 1 <= done < 8, "the run must be killed mid-way for this test to mean anything"
    resumed = subprocess.run(run_args(model_dir, tmp_path / "killed", 8) + ["--resume"], env=ENV, check=True,
                             capture_output=True, text=True)
    assert f"after epoch {done}" in resumed.stderr
    assert_same_weights(uninterrupted, tmp_path / "killed")


# Killed by its own hand halfway through writing epoch 4's trainer.pt (written last, after state/ and model/).
KILL_IN_CHECKPOINT_WRITE = """
import os, signal, sys
import engine.runs
real_save = engine.runs.torch.save
def save(state, path, *args, **kwargs):
    if str(path).endswith("trainer.pt") and state["epoch"] == 4:
        open(path, "wb").write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(state, path, *args, **kwargs)
engine.runs.torch.save = save
import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_kill_in_a_checkpoint_write_then_a_corrupt_latest_resume_from_the_one_before(model_dir, tmp_path,
                                                                                      uninterrupted):
    out = tmp_path / "run"
    script = [sys.executable, "-c", KILL_IN_CHECKPOINT_WRITE] + run_args(model_dir, out, 8)[2:]
    killed = subprocess.run(script, env={**ENV, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / "latest").read_text() == "checkpoint-3" and (out / ".checkpoint-4.tmp").is_dir()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    (out / "checkpoint-3" / "trainer.pt").write_bytes(b"a disk error later")
    resumed = subprocess.run(run_args(model_dir, out, 8) + ["--resume"], env=ENV, check=True, capture_output=True,
                             text=True)
    assert f"cannot read {out / 'checkpoint-3' / 'trainer.pt'}" in resumed.stderr
    assert f"resuming from {out / 'checkpoint-2'} instead" in resumed.stderr
    assert f"resuming {out} after epoch 2" in resumed.stderr
    assert_same_weights(uninterrupted, out)
    assert not (out / ".checkpoint-4.tmp").exists()


RANKS_ARGS = ["--poems", 8, "--epochs", 3, "--lr", "3e-3", "--batch-tokens", 384, "--eval-every", 100,
              "--format", "plain", "--log-every", 1, "--checkpoint-every", 1]


@pytest.fixture(scope="module")
def ranked_runs(model_dir, tmp_path_factory):
    """The same run in 1, 2 and 4 gloo processes (the engine's launcher, as torchrun would start them)."""
    root = tmp_path_factory.mktemp("ranks")
    for n in (1, 2, 4):
        succeeds(cli("--model", model_dir, *RANKS_ARGS, "--out", root / str(n), "--nproc-per-node", n))
    return root


def succeeds(command) -> str:
    """Runs the command; its stderr (a failure shows it)."""
    done = subprocess.run(command, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stderr


def same_run(got: Path, want: Path, tolerance: float) -> None:
    """got's run ended as want's: per-step losses, final weights within `tolerance` (relative, each tensor),
    recitations."""
    losses = [[m["loss"] for m in read_jsonl(run / "metrics.jsonl") if "loss" in m] for run in (want, got)]
    assert len(losses[0]) == len(losses[1]) > 5
    assert torch.allclose(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4 if tolerance else 0, atol=0)
    weights = [load_file(run / "model" / "model.safetensors") for run in (want, got)]
    for name, tensor in weights[0].items():
        assert torch.equal(weights[1][name], tensor) if tolerance == 0 else rel_err(weights[1][name], tensor) < tolerance, name
    generations = [read_jsonl(run / "generations.jsonl") for run in (want, got)]
    trained_bits = [[g.pop("bits") for g in run] for run in generations]     # of weights equal to ~1e-4
    assert generations[1] == generations[0]
    assert trained_bits[1] == pytest.approx(trained_bits[0], rel=1e-3)


# AdamW's 1/sqrt(v) lets fp32 summation order move a weight whose gradient is ~0 (a k_proj bias) by up
# to a step: measured 6.1e-5 (2 ranks) and 5.6e-5 (4 ranks) relative, in k_proj biases, every other tensor
# far less; ranks that train without the gradient reduction were 5e-3 or more off (measured with GradSync)
TOLERANCE = 2e-4


@pytest.mark.parametrize("n", [2, 4])
def test_n_gloo_processes_match_one_process(ranked_runs, n):
    """At the default micro-batch setting (a step is one packed micro-batch) each rank trains on its
    share of every step's sequences under FSDP2: the same losses, final weights and recitations as
    one process, and 1/N of its weights, gradients and optimizer state on each rank."""
    one, got = (json.loads((ranked_runs / run / "results.json").read_text()) for run in ("1", str(n)))
    assert got["world_size"] == n and sum(got["train_tokens_per_rank"]) == one["train_tokens"]
    assert one["state_bytes_per_rank"] == [16 * one["parameters"]]       # fp32: weights, gradients, 2 moments
    assert sum(got["state_bytes_per_rank"]) == one["state_bytes_per_rank"][0]
    assert max(got["state_bytes_per_rank"]) < 1.05 * one["state_bytes_per_rank"][0] / n
    same_run(ranked_runs / str(n), ranked_runs / "1", TOLERANCE)


def after_epoch(run: Path, epoch: int, copy: Path) -> Path:
    """A copy of a finished run as a kill right after epoch `epoch`'s checkpoint would have left it."""
    import shutil
    shutil.copytree(run, copy)
    for later in [copy / f"checkpoint-{e}" for e in range(epoch + 1, 10)] + [copy / "model"]:
        shutil.rmtree(later, ignore_errors=True)
    for name in ("results.json", "report.md"):
        (copy / name).unlink()
    (copy / "latest").write_text(f"checkpoint-{epoch}")
    return copy


@pytest.mark.parametrize("n", [1, 2, 4])
def test_a_run_saved_on_two_ranks_resumes_on_any_number(ranked_runs, tmp_path, n):
    resumed = after_epoch(ranked_runs / "2", 2, tmp_path / "resumed")      # the newest two are kept: 2 and 3
    assert f"resuming {resumed} after epoch 2 (step" in succeeds(cli("--resume", "--out", resumed, "--nproc-per-node", n))
    assert json.loads((resumed / "results.json").read_text())["world_size"] == n
    same_run(resumed, ranked_runs / "2", 0 if n == 2 else TOLERANCE)      # bit for bit on as many ranks


def rank_pid(out: Path, rank: int) -> int | None:
    """The process of `rank` in the run writing to `out` (its command line names out; its environment the rank)."""
    for proc in Path("/proc").iterdir():
        try:
            if str(out) in (proc / "cmdline").read_text() and f"\0RANK={rank}\0" in (proc / "environ").read_text():
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


def test_a_killed_rank_then_resume_gives_the_uninterrupted_weights(ranked_runs, model_dir, tmp_path):
    out = tmp_path / "killed"
    args = cli("--model", model_dir, *RANKS_ARGS, "--out", out, "--nproc-per-node", 2)
    killed = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "latest").is_file() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(rank_pid(out, 1), signal.SIGKILL)
    assert killed.wait(timeout=120) == 2 and "rank 1" in killed.stderr.read()
    done = int((out / "latest").read_text().split("-")[1])
    assert 1 <= done < 3, "the run must be killed mid-way for this test to mean anything"
    assert f"resuming {out} after epoch {done}" in succeeds(cli("--resume", "--out", out, "--nproc-per-node", 2))
    same_run(out, ranked_runs / "2", 0)


# ---- bad input ---------------------------------------------------------------------------------

def test_unknown_model(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'gpt-9'"):
        memorize(TrainConfig(model="gpt-9", out=str(tmp_path)), progress=False)


def test_unwritable_output(model_dir, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(TrainingError, match="cannot write to the output directory"):
        memorize(config(model_dir, tmp_path / "file" / "out"), progress=False)


def test_existing_run_needs_resume(model_dir, tmp_path):
    memorize(config(model_dir, tmp_path, epochs=1, warmup_steps=1), progress=False)
    with pytest.raises(TrainingError, match="already holds a run: pass --resume"):
        memorize(config(model_dir, tmp_path, epochs=1, warmup_steps=1), progress=False)


def test_dataset_without_columns(model_dir, tmp_path):
    source = tmp_path / "poems.jsonl"
    source.write_text(json.dumps({"writer": "x", "title": "t", "content": "c"}) + "\n")
    with pytest.raises(ValueError, match="author"):
        memorize(config(model_dir, tmp_path / "out", source=str(source)), progress=False)


def test_poem_longer_than_the_budget(model_dir, tmp_path):
    with pytest.raises(ValueError, match="more than the 16-token budget"):
        memorize(config(model_dir, tmp_path / "out", batch_tokens=16), progress=False)
