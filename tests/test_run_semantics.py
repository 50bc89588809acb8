"""What researchers do with runs after training them: eval a run, resume it, report and sweep over runs,
and what happens when something goes wrong on the way. Each test names the failure it guards against.
The README's follow-up commands run verbatim (from a folder holding a link to cli.py, so that their
relative runs/ paths land in a temporary folder)."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cli
from engine.data import load_poems
from engine.evaluate import run_eval
from engine.runs import TrainingError, keep_jsonl, read_jsonl
from engine.train import TrainConfig, memorize
from tests.helpers import tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FAST = dict(poems=4, epochs=2, batch_tokens=256, eval_every=1, checkpoint_every=1, warmup_steps=1)


def tiny_run(out, model_dir, **overrides):
    return memorize(TrainConfig(model=str(model_dir), out=str(out), **{**FAST, **overrides}), progress=False)


def run_cli(capsys, *args):
    status = cli.main([str(arg) for arg in args])
    return status, capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", hidden=128)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, model_dir):
    """A chat-format run of 4 poems that recites all of them, under a README-like runs/ folder."""
    home = tmp_path_factory.mktemp("home")
    out = home / "runs" / "qwen2-0.5b-cn-256"
    results = memorize(TrainConfig(model=str(model_dir), out=str(out), poems=4, epochs=40, lr=3e-3, batch_tokens=256,
                                   eval_every=40, checkpoint_every=40, warmup_steps=5, format="chat"), progress=False)
    assert results["accuracy"] == 1.0 and results["config"]["format"] == "chat"
    return home, out


def verbatim(home: Path, command: str) -> subprocess.CompletedProcess:
    """A README command as written, run from `home` (cli.py linked there, so runs/ is home's)."""
    if not (home / "cli.py").exists():
        (home / "cli.py").symlink_to(ROOT / "cli.py")
    return subprocess.run(["bash", "-c", command.replace("python ", f"{sys.executable} ", 1)], cwd=home, env=ENV,
                          capture_output=True, text=True, timeout=600)


# ---- 1. eval of a run answers the run's question

def test_the_readme_eval_of_a_chat_run_recites_what_it_learned(chat_run):
    """Before: the format was guessed from the folder's name (plain), and 2,000 poems were asked: 0% / 1.6%."""
    home, out = chat_run
    done = verbatim(home, "python cli.py eval --model runs/qwen2-0.5b-cn-256/model --lang cn --out runs/eval")
    assert done.returncode == 0, done.stderr
    assert "exact recitation: 100.00% of 4 poems -> runs/eval" in done.stdout
    assert "the run's settings" in done.stderr and "format chat" in done.stderr
    results = json.loads((home / "runs" / "eval" / "results.json").read_text())
    assert results["format"] == "chat" and results["poems_sha256"] == json.loads(
        (out / "config.json").read_text())["poems_sha256"]


def test_a_copied_model_folder_and_a_run_folder_evaluate_alike(chat_run, tmp_path, capsys):
    _, out = chat_run
    shutil.copytree(out / "model", tmp_path / "copy")
    assert run_eval(tmp_path / "copy", tmp_path / "a", say=lambda line: None)["accuracy"] == 1.0
    status, err = run_cli(capsys, "eval", out, "--out", tmp_path / "b", "--poems", 2)
    assert status == 0 and "--poems 2 instead of the run's 4" in err
    assert json.loads((tmp_path / "b" / "results.json").read_text())["n_poems"] == 2


def test_eval_locks_its_folder_and_never_replaces_results_silently(chat_run, tmp_path, capsys):
    """Before: no lock, and a second eval replaced the first without a word."""
    from engine.runs import check_output, claimed
    _, out = chat_run
    assert run_cli(capsys, "eval", out, "--out", tmp_path / "e")[0] == 0
    status, err = run_cli(capsys, "eval", out, "--out", tmp_path / "e")
    assert status == 2 and "holds an earlier evaluation: pass --overwrite" in err
    assert run_cli(capsys, "eval", out, "--out", tmp_path / "e", "--overwrite")[0] == 0
    with claimed(tmp_path / "busy", lambda folder: check_output(folder, False)):     # a memorize is writing there
        status, err = run_cli(capsys, "eval", out, "--out", tmp_path / "busy")
    assert status == 2 and "is in use by another run or evaluation" in err
    status, err = run_cli(capsys, "eval", out, "--out", out)
    assert status == 2 and "holds a memorize run: eval writes only into a new or empty folder" in err


# ---- 2. no kill loses a line

def test_a_kill_during_a_jsonl_trim_keeps_every_line(tmp_path, monkeypatch):
    """Before: the trim truncated the file, then wrote it: a kill in between emptied metrics.jsonl."""
    import models.weights
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": step} for step in range(1, 6)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))

    def killed(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(models.weights.os, "replace", killed)      # the instant before the new file takes over
    with pytest.raises(KeyboardInterrupt):
        keep_jsonl(path, lambda line: line["step"] <= 2)
    assert read_jsonl(path) == lines and os.listdir(tmp_path) == ["metrics.jsonl"]
    monkeypatch.undo()
    keep_jsonl(path, lambda line: line["step"] <= 2)
    assert read_jsonl(path) == lines[:2]


def test_a_damaged_jsonl_line_is_named(tmp_path):
    """Before: a bare JSONDecodeError that named neither the file nor the line."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON record"):
        read_jsonl(path)


# ---- 3. --resume is the run's own

def test_resume_needs_only_the_folder_and_extends_only_when_asked(model_dir, tmp_path, capsys):
    """Before: without every flag again it refused (--poems 32 (the run: 16)), and the default --epochs 100
    silently extended a shorter run."""
    out = tmp_path / "run"
    tiny_run(out, model_dir)
    os.remove(out / "results.json")                        # as if killed after its last checkpoint
    assert run_cli(capsys, "memorize", "--resume", "--out", out)[0] == 0
    assert json.loads((out / "results.json").read_text())["epochs"] == 2
    assert run_cli(capsys, "memorize", "--resume", "--out", out, "--epochs", 3)[0] == 0
    assert json.loads((out / "results.json").read_text())["epochs"] == 3
    status, err = run_cli(capsys, "memorize", "--resume", "--out", out, "--lr", 0.1)
    assert status == 2 and "--lr 0.1 (the run: 2e-05)" in err


def test_resume_checks_settings_without_config_json_and_refuses_other_poems(model_dir, tmp_path, capsys):
    """Before: without config.json any settings were accepted, and an edited --source trained the rest of
    the run on other poems under the same indices."""
    source = tmp_path / "poems.jsonl"
    rows = [{"author": f"a{i}", "title": f"t{i}", "content": f"line {i} of a poem"} for i in range(6)]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    tiny_run(out, model_dir, lang="en", source=str(source), epochs=1)
    (out / "config.json").unlink()
    os.remove(out / "results.json")
    status, err = run_cli(capsys, "memorize", "--resume", "--out", out, "--poems", 5)
    assert status == 2 and "--poems 5 (the run: 4)" in err
    rows[0]["content"] = "another poem altogether"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    status, err = run_cli(capsys, "memorize", "--resume", "--out", out)
    assert status == 2 and "the training poems differ from the ones" in err


# ---- 4. report compares what is comparable, and writes only its own files

def test_report_dedups_refuses_mixed_settings_and_never_writes_into_a_run(model_dir, tmp_path, capsys):
    """Before: a folder given twice counted twice; runs with other --epochs pooled as seeds; report.md
    written into the run's own folder."""
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    tiny_run(a, model_dir)
    tiny_run(b, model_dir, epochs=1)
    report_md = (a / "report.md").read_text()
    status, err = run_cli(capsys, "report", a, a, "--out", tmp_path / "one")
    assert status == 0 and "wrote" in err and (tmp_path / "one" / "report.md").read_text().count(
        "| a | ") == 1
    status, err = run_cli(capsys, "report", a, b, "--out", tmp_path / "two")
    assert status == 2 and "differ in --epochs 2 vs 1, not only in the seed" in err
    status, err = run_cli(capsys, "report", a, "--out", a)
    assert status == 2 and "inside the run" in err and (a / "report.md").read_text() == report_md
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.md").write_text("my notes\n")
    status, err = run_cli(capsys, "report", a, "--out", tmp_path / "mine")
    assert status == 2 and "was not written by cli.py report" in err


# ---- 5. sweep checks before it trains, and never reuses a run made otherwise

def test_sweep_validates_first_and_refuses_stale_runs(model_dir, tmp_path, capsys):
    """Before: another --epochs printed 'finished, skipped' and kept the old runs; --seeds 0,0 ran once and
    counted twice; --length 300 failed as KeyError when its run started."""
    root = tmp_path / "sweep"
    common = ["sweep", "--models", model_dir, "--poems", 4, "--out-root", root]
    assert run_cli(capsys, *common, "--epochs", 1)[0] == 0
    status, err = run_cli(capsys, *common, "--epochs", 2)
    assert status == 2 and "holds a finished run with other settings: --epochs 1 (asked: 2)" in err
    for bad, message in ((["--seeds", "0,0"], "names 0 twice"), (["--length", "300"], "--length 300: choose from"),
                         (["--lang", "en"], "pass --source")):
        status, err = run_cli(capsys, *common, "--out-root", tmp_path / "fresh", *bad)
        assert status == 2 and message in err and not (tmp_path / "fresh").exists(), err
    twin = tmp_path / "other" / "model"
    shutil.copytree(model_dir, twin)
    status, err = run_cli(capsys, "sweep", "--models", f"{model_dir},{twin}", "--out-root", tmp_path / "fresh")
    assert status == 2 and "several runs would share" in err


def test_the_readme_report_and_profile_commands(model_dir, chat_run):
    """Before: `report runs/sweep/*` failed on the sweep's own PNGs, and `profile` on an eval folder."""
    home, _ = chat_run
    sweep = verbatim(home, f"python cli.py sweep --models {model_dir} --poems 4 --epochs 1 --seeds 0,1")
    assert sweep.returncode == 0, sweep.stderr
    assert "sweep: 2 of 2 runs finished; report: runs/sweep/report.md" in sweep.stderr
    assert (home / "runs" / "sweep" / "curves.png").is_file()
    done = verbatim(home, "python cli.py report runs/sweep/*")
    assert done.returncode == 0 and "runs/sweep/report.md (and its plots" in done.stderr, done.stderr
    (home / "runs" / "eval").mkdir(exist_ok=True)
    (home / "runs" / "eval" / "results.json").write_text(json.dumps({"command": "eval", "accuracy": 1.0}))
    done = verbatim(home, "python cli.py profile --models tiny-qwen2 --poems 4")
    assert done.returncode == 0, done.stderr


# ---- 6. failures say what happened and what to do

@pytest.mark.parametrize("every,what", [(1, "the checkpoint"), (0, "the final model")])
def test_a_full_disk_while_saving_is_one_line_and_leaves_no_temporary_folder(model_dir, tmp_path, monkeypatch,
                                                                           every, what):
    """Before: SafetensorError or torch's 'unexpected pos', and a temporary folder left behind."""
    import models.weights

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 64")
    monkeypatch.setattr(models.weights, "save_file", full)
    with pytest.raises(TrainingError, match=f"cannot write {what} .*free disk space .*--resume"):
        tiny_run(tmp_path / "run", model_dir, checkpoint_every=every)
    assert not list(tmp_path.rglob(".*.tmp"))


def test_a_tokenizer_larger_than_the_model_is_named(tmp_path):
    """Before: IndexError in the first forward."""
    from models import build_model, load_tokenizer
    from models.config import ModelConfig
    from models.registry import REGISTRY
    config = {**REGISTRY["tiny-qwen2"].config, "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128}
    build_model(ModelConfig.from_dict(config)).save_pretrained(tmp_path / "model", load_tokenizer("tiny-qwen2"))
    with pytest.raises(ValueError, match="but the model has 300 embeddings"):
        tiny_run(tmp_path / "run", tmp_path / "model")


def test_ctrl_c_says_what_exists_on_disk(model_dir, tmp_path, monkeypatch, capsys):
    """Before: always 'a run keeps its last checkpoint', even before one existed, and in eval."""
    import engine.evaluate
    import engine.train

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(engine.train, "train", interrupt)
    status, err = run_cli(capsys, "memorize", "--model", model_dir, "--out", tmp_path / "run", "--poems", 2)
    assert status == 2 and "no checkpoint of the run" in err and "start it again" in err
    monkeypatch.setattr(engine.evaluate, "evaluate", interrupt)
    status, err = run_cli(capsys, "eval", "--model", model_dir, "--poems", 2, "--out", tmp_path / "e")
    assert status == 2 and "the evaluation wrote nothing" in err


# ---- 7. the poems' source is questioned

def test_the_loader_refuses_what_cannot_be_recited(tmp_path):
    """Before: a number became the target text, <|endoftext|> became an EOS inside a poem, a BOM hid the
    CSV's first column, and a mistyped path was looked up on the hub."""
    rows = [{"author": "a", "title": "t", "content": "fine"}, {"author": "b", "title": "u", "content": 42}]
    bad = tmp_path / "numbers.jsonl"
    bad.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"row 2: content is int '42', not text"):
        load_poems("en", 256, None, source=bad)
    with_bom = tmp_path / "poems.csv"
    with open(with_bom, "w", encoding="utf-8-sig", newline="") as f:
        writer = csv.DictWriter(f, ["author", "title", "content"])
        writer.writeheader()
        writer.writerow({"author": "a", "title": "t", "content": "a poem"})
    assert [p.author for p in load_poems("en", 256, None, source=with_bom)] == ["a"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_poems("en", 256, None, source="poems/en.jsonl")
    from engine.data import Poem, encode_examples
    from models import load_tokenizer
    with pytest.raises(ValueError, match="special token <|endoftext|>"):
        encode_examples([Poem("", "a", "t", "roses<|endoftext|>")], load_tokenizer("tiny-qwen2"), "en", "plain")


# ---- 8. values that pass a type check but make no sense

@pytest.mark.parametrize("args,message", [
    (("--lr", "inf"), "--lr must be a finite number above 0 (got inf)"),
    (("--lr", "nan"), "--lr must be a finite number above 0 (got nan)"),
    (("--weight-decay", "1e12"), "--weight-decay 1000000000000.0 with --lr 0.003"),
    (("--warmup-steps", "100000"), "--warmup-steps 100000 is longer than the run"),
    (("--out", ""), "--out must be a folder name, not empty"),
    (("--seed", "-1"), "--seed must be in [0, 2^32) (got -1)"),
    (("--lang", "fr"), "argument --lang: invalid choice: 'fr'"),
])
def test_values_that_make_no_sense_are_refused_before_loading(capsys, tmp_path, args, message):
    status, err = run_cli(capsys, "memorize", "--model", "tiny-qwen2", "--poems", 4, "--out", tmp_path / "run", *args)
    assert status == 2 and err.startswith("error: ") and message in err and "\n" not in err, err
