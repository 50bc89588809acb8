"""What a researcher sees and keeps: the start summary and train.log, provenance in results.json and
report.md, a run re-made from its config file, checkpoints that fit a disk, several processes from cli.py."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cli
from engine.train import ConfigError, read_config_file

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny-qwen2", "--poems", 4, "--epochs", 2, "--eval-every", 1, "--warmup-steps", 1]


def run_cli(capsys, *args):
    status = cli.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny run through the CLI, its console captured."""
    out = tmp_path_factory.mktemp("runs") / "a"
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "memorize", *map(str, TINY), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return out, done


def test_the_console_and_train_log_say_what_the_run_does(finished):
    out, done = finished
    log = [re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", "", line) for line in (out / "train.log").read_text().splitlines()]
    assert log[0].startswith("run: tiny-qwen2 (4.0M parameters, float32) memorizes 4 cn-256 poems in the plain format")
    assert [line.split(":")[0] for line in log[1:6]] == ["weights", "poems", "steps", "device", "out"]
    assert "a checkpoint every 10 epochs, 63.2 MB each" in log[5]
    assert "epoch 1/2: reciting 4 poems ..." in log
    assert any(re.match(r"epoch 2/2: \d/4 recited exactly \(\d+\.\d\d%\), loss ", line) for line in log)
    assert sum(line.startswith("metrics ") for line in log) == len((out / "metrics.jsonl").read_text().splitlines())
    assert log[-2].startswith("done: ") and log[-1].startswith(f"wrote {out}: model/")
    for line in log:                                   # the console showed each logged line (metrics aside)
        assert line.startswith("metrics ") or line in done.stderr, line
    assert "\r" not in (out / "train.log").read_text()


def test_results_and_report_carry_their_provenance(finished):
    out, _ = finished
    found = json.loads((out / "results.json").read_text())["provenance"]
    assert "cli.py memorize --model tiny-qwen2 --poems 4" in found["command"]
    assert found["versions"]["torch"] == torch.__version__ and found["versions"]["python"]
    assert found["model"] == {"name": "tiny-qwen2", "path": None, "hub_id": None, "revision": None,
                              "weights_sha256": None}
    config = json.loads((out / "config.json").read_text())
    assert found["poems_sha256"] == config["poems_sha256"] and found["started"] <= found["ended"]
    assert found["host"] and found["device"].startswith("cpu") and "commit" in found["engine"]
    report = (out / "report.md").read_text()
    assert "## Provenance" in report and found["poems_sha256"][:16] in report


def test_a_run_remade_from_its_config_json_is_the_same_run(finished, tmp_path, capsys):
    out, _ = finished
    status, _, err = run_cli(capsys, "memorize", "--config", out / "config.json", "--out", tmp_path / "b")
    assert status == 0, err
    first, second = (json.loads((folder / "config.json").read_text()) for folder in (out, tmp_path / "b"))
    assert {**first, "out": None} == {**second, "out": None}
    a, b = (load_file(folder / "model" / "model.safetensors") for folder in (out, tmp_path / "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_config_files_in_yaml_and_toml_and_their_errors(tmp_path):
    (tmp_path / "run.yaml").write_text("model: tiny-qwen2\npoems: 4\nbetas: [0.9, 0.99]\n")
    assert read_config_file(tmp_path / "run.yaml") == {"model": "tiny-qwen2", "poems": 4, "betas": (0.9, 0.99)}
    if sys.version_info >= (3, 11):
        (tmp_path / "run.toml").write_text('model = "tiny-qwen2"\nepochs = 3\n')
        assert read_config_file(tmp_path / "run.toml") == {"model": "tiny-qwen2", "epochs": 3}
    (tmp_path / "bad.json").write_text('{"model": "tiny-qwen2", "epoch": 3}')
    with pytest.raises(ConfigError, match="epoch is not a setting of memorize"):
        read_config_file(tmp_path / "bad.json")
    (tmp_path / "neg.json").write_text('{"poems": 0}')
    with pytest.raises(ConfigError, match="--poems must be at least 1"):
        read_config_file(tmp_path / "neg.json")
    with pytest.raises(ConfigError, match="use a .json, .yaml"):
        read_config_file(tmp_path / "run.ini")


def test_no_mid_run_checkpoints_writes_only_the_final_model(tmp_path, capsys):
    status, _, err = run_cli(capsys, "memorize", *TINY, "--checkpoint-every", 0, "--out", tmp_path / "run")
    assert status == 0, err
    assert not list((tmp_path / "run").glob("checkpoint-*")) and not (tmp_path / "run" / "latest").exists()
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert "no mid-run checkpoints (--checkpoint-every 0): a kill loses the run" in err


def test_several_processes_from_cli_py(tmp_path):
    """A bad argument: one line, exit 2, nothing started (torchrun printed each rank's line and its own
    traceback). Good arguments: two gloo processes train the run, as torchrun's would."""
    command = [sys.executable, str(ROOT / "cli.py"), "memorize", "--nproc-per-node", "2", *map(str, TINY),
               "--out", str(tmp_path / "run")]
    bad = subprocess.run(command + ["--lr", "-1"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr == "error: --lr must be a finite number above 0 (got -1.0)\n"
    good = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert good.returncode == 0, good.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["world_size"] == 2 and "2 processes" in (tmp_path / "run" / "train.log").read_text()
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)     # the run is refused, whole
    assert again.returncode == 2 and again.stderr == (f"error: {tmp_path / 'run'} already holds a run: pass --resume "
                                                      "to continue it, or another --out\n")
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results


def test_a_failure_inside_the_ranks_is_one_line(tmp_path):
    """Every rank fails the same way (a truncated checkpoint): one line, exit 2 (each rank printed it, then the
    launcher a line of its own), whichever rank failed first. The launcher's folder of error lines is gone
    after, and so is the run's folder, which held no checkpoint."""
    from tests.helpers import tiny_checkpoint
    model = tiny_checkpoint(tmp_path / "model")
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:1000])
    command = [sys.executable, str(ROOT / "cli.py"), "memorize", "--nproc-per-node", "2", "--model", str(model),
               "--poems", "4", "--epochs", "1", "--out", str(tmp_path / "run")]
    failed = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1, failed.stderr
    assert failed.stderr.startswith(f"error: {model / 'model.safetensors'} is truncated or corrupt"), failed.stderr
    assert not list(tmp_path.glob("rank-errors-*")) and not (tmp_path / "run").exists()


def test_the_launcher_names_what_one_line_does_not_explain():
    from engine.launch import failure_lines
    corrupt, lost = "error: the checkpoint is corrupt", "error: connection closed by peer"
    term, kill = -signal.SIGTERM, -signal.SIGKILL
    # one story: every failed rank told it, or told it and the launcher stopped the others (rank 0 among them)
    assert failure_lines({0: corrupt, 1: corrupt}, {0: 2, 1: 2}, 2) == [corrupt]
    assert failure_lines({0: corrupt}, {0: 2, 1: term, 2: term}, 3) == [corrupt]
    assert failure_lines({1: corrupt}, {0: term, 1: 2}, 2) == [corrupt]
    # two stories: each, naming its ranks, and the summary
    assert failure_lines({0: corrupt, 1: lost, 2: lost}, {0: 2, 1: 2, 2: 2}, 3) == [
        f"{corrupt} (rank 0)", f"{lost} (ranks 1, 2)", "error: 3 of 3 processes failed: rank 0 (exit code 2), "
        "rank 1 (exit code 2), rank 2 (exit code 2); their messages are above"]
    # a rank killed by a signal of someone else's: named, whatever the others told
    assert failure_lines({0: lost}, {0: 2, 1: kill}, 2) == [
        f"{lost} (rank 0)", "error: 2 of 2 processes failed: rank 0 (exit code 2), rank 1 (exit code -9); their "
        "messages are above"]
    assert failure_lines({}, {0: term, 1: kill}, 2) == [
        "error: 2 of 2 processes failed: rank 0 (exit code -15), rank 1 (exit code -9)"]


@pytest.mark.parametrize("signalled", ["Ctrl-C", "SIGTERM to the launcher"])
def test_an_interrupted_run_on_several_ranks_is_one_line(tmp_path, signalled):
    """Ctrl-C (SIGINT to the whole process group) or a scheduler's SIGTERM to the launcher alone, after the
    first checkpoint: one line naming the checkpoint to resume from, exit 2. The launcher used to add
    "SignalException ... please report it"; rank 0, interrupted inside a checkpoint's collective after
    rank 1 had exited, said "cannot write the checkpoint (Connection closed by peer): free disk space"."""
    from tests.helpers import tiny_checkpoint
    model, out = tiny_checkpoint(tmp_path / "model"), tmp_path / "run"
    run = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "memorize", "--nproc-per-node", "2", "--model",
                            str(model), "--poems", "16", "--epochs", "200", "--checkpoint-every", "1", "--eval-every",
                            "1000", "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / "latest").is_file() and run.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert run.poll() is None, "the run must be under way for this test to mean anything"
    if signalled == "Ctrl-C":
        os.killpg(run.pid, signal.SIGINT)
    else:
        run.send_signal(signal.SIGTERM)
    errors = [line for line in run.communicate(timeout=120)[1].replace("\r", "\n").splitlines() if "error" in line]
    assert run.returncode == 2 and len(errors) == 1, errors
    assert re.fullmatch(rf"error: interrupted: {re.escape(str(out))} keeps its checkpoint of epoch \d+: continue with "
                        rf"python cli.py memorize --resume --out {re.escape(str(out))}", errors[0]), errors
