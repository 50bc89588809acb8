"""The run's console: what it prints is what train.log keeps (bar redraws aside), plus the metric lines."""
import re

from engine.console import Console, duration, size


def test_log_keeps_the_printed_lines_and_the_metrics(tmp_path, capsys):
    console = Console(tmp_path / "train.log")
    console.say("run: tiny-qwen2\nout: runs/x")
    with console.progress(4, 0, "tiny-qwen2 cn 256 seed 0") as bar:
        bar.update(2)
        console.say("epoch 1: recitation 50.00%")
        bar.update(2)
    console.metrics({"step": 4, "loss": 0.5})
    lines = (tmp_path / "train.log").read_text().splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
    assert [re.sub(stamp, "", line) for line in lines] == ["run: tiny-qwen2", "out: runs/x", "epoch 1: recitation 50.00%",
                                                           "metrics step=4, loss=0.5"]
    assert all(re.match(stamp, line) for line in lines)
    err = capsys.readouterr().err
    assert "run: tiny-qwen2" in err and "epoch 1: recitation 50.00%" in err and "metrics" not in err


def test_off_rank_0_nothing_is_shown_or_kept(tmp_path, capsys):
    console = Console(tmp_path / "train.log", enabled=False)
    console.say("x")
    console.metrics({"a": 1})
    with console.progress(2, 0, "d") as bar:
        bar.update(1)
    assert not (tmp_path / "train.log").exists() and capsys.readouterr().err == ""


def test_durations_and_sizes():
    assert [duration(s) for s in (0.4, 42, 383, 7500)] == ["0s", "42s", "6m23s", "2h05m"]
    assert [size(b) for b in (512, 48e6, 7.1e9)] == ["512 B", "48 MB", "7.1 GB"]
