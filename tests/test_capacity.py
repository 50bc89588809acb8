"""The capacity sweep: nested samples, the reuse rule, the report's numbers against the runs' own files,
and `cli.py capacity`'s argument checks."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cli
from engine import capacity as cap
from engine.data import Poem, load_poems, prompt_text, select
from engine.runs import read_jsonl
from engine.stats import wilson_interval

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data"))
from build_cn import nested_order  # noqa: E402

MODEL = "tiny-qwen2-160k"
TINY_RUN = {"epochs": 2, "eval_every": 1, "device": "cpu"}


def test_nested_order_is_deterministic_and_each_sample_holds_the_smaller():
    pool = [Poem("唐代", f"author {i}", f"title {i}", "床前明月光") for i in range(200)]
    order = nested_order(pool, seed=0)
    assert order == nested_order(pool, seed=0)                  # same seed, same poems, same order
    assert order != nested_order(pool, seed=1) and sorted(order, key=pool.index) == pool
    for small, large in [(10, 20), (20, 100), (100, 200)]:
        assert set(order[:small]) <= set(order[:large])


def test_the_shipped_sample_is_nested_and_valid(tmp_path):
    lines = cap.nested_lines(cap.NESTED_POEMS)
    assert len(lines) == cap.NESTED_POEMS and cap.nested_lines(100) == lines[:100]
    first = cap.sample_file(tmp_path, 50).read_text(encoding="utf-8").splitlines(keepends=True)
    assert first == lines[:50] and cap.sample_file(tmp_path, 200).read_text(encoding="utf-8").startswith("".join(first))
    poems = [Poem(**json.loads(line)) for line in lines]
    assert select(poems, "cn", 256, None, 0) == poems           # every poem in the 256 bin with a unique prompt
    assert gzip.decompress(cap.NESTED.read_bytes()).decode("utf-8") == "".join(lines)
    frozen = {prompt_text(poem, "cn") for poem in load_poems("cn", 256)}
    assert not frozen & {prompt_text(poem, "cn") for poem in poems}      # beyond the frozen 2,000 (data/README.md)


@pytest.mark.skipif(not os.environ.get("CHINESE_POETRY_TGZ"), reason="set CHINESE_POETRY_TGZ to chinese-poetry-2.0.1.tgz")
def test_build_cn_nested_is_bit_identical(tmp_path):
    build = [sys.executable, str(cap.NESTED.parent / "build_cn.py"), "--tarball", os.environ["CHINESE_POETRY_TGZ"]]
    subprocess.run(build + ["--out", str(tmp_path), "--nested", str(cap.NESTED_POEMS)], check=True, capture_output=True)
    assert (tmp_path / cap.NESTED.name).read_bytes() == cap.NESTED.read_bytes()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two sizes x two seeds of a 2-epoch tiny run, and the capacity report over them."""
    root = tmp_path_factory.mktemp("capacity")
    result = cap.capacity([MODEL], [4, 8], seeds=[0, 1], root=root, **TINY_RUN)
    return root, result["summaries"][0]


def test_the_report_equals_the_runs_own_numbers(sweep, one_thread):
    root, summary = sweep
    assert json.loads((root / Path(MODEL).name / "capacity.json").read_text()) == json.loads(json.dumps(summary))
    for row in summary["sizes"]:
        correct, bits, params = [], [], None
        for seed in (0, 1):
            folder = cap.run_folder(root, MODEL, row["poems"], seed)
            results = json.loads((folder / "results.json").read_text())
            lines = read_jsonl(folder / "evals.jsonl")
            last = [line for line in lines if line["epoch"] == results["epochs"]]
            assert len(last) == row["poems"]
            correct.append(sum(line["correct"] for line in last))
            base = read_jsonl(folder / "metrics.jsonl")[0]          # epoch 0: the base model's bits
            assert base["epoch"] == 0
            bits.append(base["bits"] - sum(line["bits"] for line in last))
            assert bits[-1] == pytest.approx(results["memorization"]["bits_gained"], abs=0.01)
            params = results["parameters"]
        assert (row["correct"], row["n"]) == (sum(correct), 2 * row["poems"])
        assert row["interval"] == list(wilson_interval(sum(correct), 2 * row["poems"]))
        assert row["bits_gained"]["mean"] == pytest.approx(sum(bits) / 2, abs=0.01)
        assert row["bits_per_parameter"] == pytest.approx(sum(bits) / 2 / params, abs=1e-6)
        assert row["memorized_poems"]["mean"] == pytest.approx(sum(correct) / 2)
    best = max(summary["sizes"], key=lambda row: (row["memorized_poems"]["mean"], -row["poems"]))
    assert (summary["knee_poems"], summary["knee_bits"]) == (best["poems"], best["bits_gained"]["mean"])
    for name in ("capacity.md", "capacity.png", "capacity.json"):
        assert (root / name).is_file() and (root / Path(MODEL).name / name).is_file()


def test_finished_runs_are_reused_and_other_settings_refused(sweep, one_thread, capsys):
    root, summary = sweep
    again = cap.capacity([MODEL], [4, 8], seeds=[0, 1], root=root, **TINY_RUN)["summaries"][0]
    assert again == summary and capsys.readouterr().err.count("reused") == 4
    with pytest.raises(ValueError, match="--epochs 3 \\(the run: 2\\)") as refused:
        cap.capacity([MODEL], [4, 8], seeds=[0], root=root, **{**TINY_RUN, "epochs": 3})
    assert "\n" not in str(refused.value)
    assert json.loads((cap.run_folder(root, MODEL, 4, 0) / "results.json").read_text())["epochs"] == 2


BAD = [
    (["--poems", "8,4"], "--poems '8,4': give distinct ascending numbers"),
    (["--poems", "4,4"], "--poems '4,4': give distinct ascending numbers"),
    (["--poems", "0,4"], "each at least 1"),
    (["--poems", "4,x"], "--poems '4,x': give comma-separated numbers"),
    (["--poems", "100000"], "--poems 100000: the nested sample holds 16384 poems"),
    (["--poems", "4", "--seeds", "0,x"], "seeds '0,x': give distinct comma-separated integers"),
    (["--poems", "4", "--epochs", "0"], "--epochs must be at least 1 (got 0)"),
    (["--poems", "4", "--models", "no-such-model"], "capacity: unknown model no-such-model"),
    (["--poems", "4", "--micro-batch-tokens", "512"], "--micro-batch-tokens 512 exceeds --batch-tokens 256"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_capacity_arguments_are_checked_first(capsys, tmp_path, args, message):
    if "--models" not in args:
        args = ["--models", MODEL, *args]
    status = cli.main(["capacity", "--out-root", str(tmp_path / "cap"), *args])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "cap").exists()


def test_profile_projects_a_capacity_sweep(tmp_path, capsys):
    import cli
    status = cli.main(["profile", "--models", "tiny-qwen2", "--poems", "4", "--capacity", "16,32", "--runs",
                       "--out", str(tmp_path / "profile")])
    out = capsys.readouterr().out
    assert status == 0 and "Projected GPU time of a capacity sweep" in out
    assert "| tiny-qwen2 | 16 |" in out and "| tiny-qwen2 | 32 |" in out
