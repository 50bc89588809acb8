"""Run folders are safe: one run per folder (a real second process is refused), memorize writes
only into new, empty or its own folders, eval never over a run, resumes keep the run's meaning,
checkpoints fall back and survive divergence. On a small random model, in process."""
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import engine.train
from engine.evaluate import run_eval
from engine.runs import TrainingError, check_output, claimed, read_jsonl
from engine.train import TrainConfig, memorize
from tests.helpers import tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def config(model_dir, out, **overrides):
    base = dict(model=str(model_dir), poems=2, epochs=1, lr=3e-3, batch_tokens=128, eval_every=100, out=str(out),
                log_every=1, checkpoint_every=1, format="plain")
    return TrainConfig(**{**base, **overrides})


def contents(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


# ---- one run per folder ------------------------------------------------------------------------

def test_a_second_process_on_the_same_folder_is_refused(model_dir, tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(ROOT / "cli.py"), "memorize", "--model", str(model_dir), "--poems", "2", "--epochs",
            "1000", "--eval-every", "1000", "--format", "plain", "--out", str(tmp_path / "run")]
    first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "config.json").is_file() and time.time() < deadline:
            time.sleep(0.05)
        second = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().splitlines()[-1] == (
            f"error: {tmp_path / 'run'} is in use by another run or evaluation (PID {first.pid}): wait for it to end, or pass "
            "another --out")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with claimed(tmp_path / "run", lambda out: check_output(out, True)):         # the dead process's lock is gone with it
        assert (tmp_path / "run" / ".lock").read_text().strip() == str(os.getpid())


# ---- memorize writes only where it may ---------------------------------------------------------

def test_foreign_folders_are_refused_untouched(model_dir, tmp_path):
    user = tmp_path / "notes"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "results.json").write_text("{}")
    cases = [(user, "is not empty and holds no run"), (evaluation, "holds an evaluation (results.json)"),
             (model_dir, "is a model folder")]
    for folder, message in cases:
        before = contents(folder)
        for resume in (False, True):
            with pytest.raises(TrainingError, match=re.escape(f"{folder} {message}: memorize writes only")):
                memorize(config(model_dir, folder, resume=resume), progress=False)
        assert contents(folder) == before


def test_a_failed_run_leaves_no_folder(model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        memorize(config(model_dir, tmp_path / "run", source=str(tmp_path / "missing.jsonl")), progress=False)
    assert not (tmp_path / "run").exists()


def test_eval_never_writes_over_a_run(model_dir, tmp_path):
    memorize(config(model_dir, tmp_path / "run"), progress=False)
    before = contents(tmp_path / "run")
    with pytest.raises(TrainingError, match="holds a memorize run: eval writes only into a new or empty folder"):
        run_eval(tmp_path / "run" / "model", out_dir=tmp_path / "run", poems=2)
    with pytest.raises(TrainingError, match="holds a memorize run: eval writes only"):
        run_eval(tmp_path / "run", out_dir=tmp_path / "run", poems=2)       # a run folder: its model/
    assert contents(tmp_path / "run") == before
    run_eval(tmp_path / "run" / "model", out_dir=tmp_path / "run" / "eval", poems=2, format="plain")
    assert (tmp_path / "run" / "eval" / "results.json").is_file()


def test_model_files_are_readable_by_everyone(model_dir, tmp_path):
    memorize(config(model_dir, tmp_path / "run"), progress=False)
    for folder in (tmp_path / "run" / "model", tmp_path / "run" / "checkpoint-1" / "model"):
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
        assert modes["model.safetensors"] & 0o044 == 0o044 and modes["config.json"] & 0o044 == 0o044, modes


# ---- resume keeps the run's meaning ------------------------------------------------------------

def test_resume_refuses_other_settings(model_dir, tmp_path):
    memorize(config(model_dir, tmp_path, epochs=2), progress=False)
    saved = (tmp_path / "config.json").read_text()
    with pytest.raises(TrainingError) as refused:
        memorize(config(model_dir, tmp_path, epochs=1, lr=1e-3, seed=1, poems=3, resume=True), progress=False)
    assert str(refused.value).startswith(f"--resume: {tmp_path} was trained with other settings: --poems 3 (the run: "
                                         "2); --epochs 1 (the run: 2); --lr 0.001 (the run: 0.003); --seed 1 (the run: 0)")
    other = tiny_checkpoint(tmp_path.parent / "bloom", family="bloom")
    with pytest.raises(TrainingError, match=f"--model {other} \\(the run: {model_dir}\\)"):
        memorize(config(model_dir, tmp_path, model=str(other), resume=True, epochs=2), progress=False)
    assert (tmp_path / "config.json").read_text() == saved


def test_resume_with_more_epochs_extends_the_run(model_dir, tmp_path, capsys):
    memorize(config(model_dir, tmp_path), progress=False)
    memorize(config(model_dir, tmp_path, epochs=2, resume=True, eval_every=1, log_every=5), progress=False)
    assert f"extending the run in {tmp_path} from 1 to 2 epochs" in capsys.readouterr().err
    assert [m["epoch"] for m in read_jsonl(tmp_path / "metrics.jsonl") if "epoch_loss" in m] == [1, 2]
    assert json.loads((tmp_path / "results.json").read_text())["epochs"] == 2


def test_resume_without_a_run(model_dir, tmp_path):
    with pytest.raises(TrainingError, match=f"--resume: {tmp_path / 'new'} holds no run to continue"):
        memorize(config(model_dir, tmp_path / "new", resume=True), progress=False)
    assert not (tmp_path / "new").exists()


# ---- checkpoints -------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [1, 2])
def test_the_newest_checkpoints_are_kept(model_dir, tmp_path, keep):
    memorize(config(model_dir, tmp_path, epochs=3, keep_checkpoints=keep), progress=False)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"][2 - keep:]
    assert (tmp_path / "latest").read_text() == "checkpoint-3"


@pytest.mark.parametrize("pointer", ["checkpoint-9", ""])
def test_a_dangling_or_empty_latest_falls_back_to_a_complete_checkpoint(model_dir, tmp_path, capsys, pointer):
    memorize(config(model_dir, tmp_path, epochs=2), progress=False)
    (tmp_path / "results.json").unlink()
    (tmp_path / "latest").write_text(pointer)
    memorize(config(model_dir, tmp_path, epochs=2, resume=True), progress=False)
    err = capsys.readouterr().err
    assert f"{tmp_path / 'latest'} names no checkpoint folder ({pointer!r})" in err
    assert f"resuming {tmp_path} after epoch 2" in err


def test_divergence_without_a_finite_checkpoint(model_dir, tmp_path):
    with pytest.raises(TrainingError, match=r"the loss became (nan|inf) at step \d+ and no checkpoint in .* holds "
                                            "finite weights: start a new run with a lower --lr"):
        memorize(config(model_dir, tmp_path, epochs=3, lr=1e30, weight_decay=0.0, poems=4), progress=False)
    assert not (tmp_path / "latest").exists() and not list(tmp_path.glob("checkpoint-*"))


def test_divergence_keeps_the_last_checkpoint_with_finite_weights(model_dir, tmp_path, monkeypatch):
    """Epoch 3's last update blows the weights up (its checkpoint holds them); epoch 4's loss is nan."""
    real_save = engine.train.save_checkpoint

    def save(out, model, *args, **kwargs):
        if args[2] == 3:                                   # epoch
            with torch.no_grad():
                next(model.parameters()).fill_(float("inf"))
        real_save(out, model, *args, **kwargs)

    monkeypatch.setattr(engine.train, "save_checkpoint", save)
    with pytest.raises(TrainingError) as stopped:
        memorize(config(model_dir, tmp_path, epochs=4, keep_checkpoints=3), progress=False)
    message = str(stopped.value)
    assert f": {tmp_path / 'checkpoint-2'} is the last checkpoint with finite weights" in message, message
    assert f"--model {tmp_path / 'checkpoint-2' / 'model'}" in message
    assert (tmp_path / "latest").read_text() == "checkpoint-2" and not (tmp_path / "checkpoint-3").exists()
    weights = load_file(tmp_path / "checkpoint-2" / "model" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.parametrize("omp", [None, "2"])
def test_cpu_threads_follow_the_models_size(model_dir, tmp_path, monkeypatch, omp):
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    torch.set_num_threads(2)
    seen, real_step = set(), engine.train.train_step
    monkeypatch.setattr(engine.train, "train_step", lambda *a, **k: seen.add(torch.get_num_threads()) or real_step(*a, **k))
    memorize(config(model_dir, tmp_path), progress=False)
    assert seen == ({1} if omp is None else {2}) and torch.get_num_threads() == 2


def test_an_interruption_inside_a_sharded_save_stays_an_interruption(tmp_path):
    """DCP's save wraps whatever a rank raised, Ctrl-C too, in a CheckpointException: written_whole gives the
    KeyboardInterrupt back (cli.py then says what the run kept), not "cannot write the checkpoint", and leaves
    no temporary folder; a real write error still becomes one TrainingError."""
    import torch.distributed.checkpoint as dcp

    from engine.runs import written_whole
    for raised, expected in ((KeyboardInterrupt(), KeyboardInterrupt), (OSError(28, "No space left"), TrainingError)):
        with pytest.raises(expected):
            with written_whole(tmp_path / "checkpoint-2", "the checkpoint", "earlier checkpoints are intact"):
                raise dcp.CheckpointException("save failed", {0: (raised, None)})
        assert list(tmp_path.iterdir()) == []
