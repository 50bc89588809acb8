"""engine/sweep.py and engine/report.py: a sweep and the paper's tables end to end on the tiny presets
(the sweep's subprocess flags: tests/test_config.py)."""
import pytest

from engine.costs import profile
from engine.report import report
from engine.runs import find_runs
from engine.sweep import sweep


@pytest.mark.slow
def test_sweep_and_report_end_to_end(tmp_path, one_thread):
    root = tmp_path / "sweep"
    train = dict(epochs=2, poems=4, batch_tokens=512, eval_every=2, lr=3e-3)
    results = sweep(["tiny-qwen2", "tiny-bloom"], ["cn"], [256], out_root=root, **train)
    assert sorted(r["model"] for r in results) == ["tiny-bloom", "tiny-qwen2"]
    finished = {d: (d / "results.json").stat().st_mtime_ns for d in root.iterdir() if d.is_dir()}
    assert len(finished) == 2

    again = sweep(["tiny-qwen2", "tiny-bloom"], ["cn"], [256], out_root=root, **train)
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in results]
    assert {d: (d / "results.json").stat().st_mtime_ns for d in finished} == finished      # not trained again

    interrupted = root / "tiny-bloom-cn-256"                  # killed after its last checkpoint
    (interrupted / "results.json").unlink()
    trained = (interrupted / "metrics.jsonl").read_text()
    sweep(["tiny-qwen2", "tiny-bloom"], ["cn"], [256], out_root=root, **train)
    assert (interrupted / "results.json").is_file() and (interrupted / "metrics.jsonl").read_text() == trained

    accuracy = {r["model"]: 100 * r["accuracy"] for r in results}
    table1, table2 = (root / "report.md").read_text().split("Table 2")
    rows = {line.split("|")[1].strip(): line for line in table1.splitlines() if line.startswith("| ")}
    for model in ("tiny-qwen2", "tiny-bloom"):
        assert rows[model].startswith(f"| {model} | {accuracy[model]:.2f} [") and rows[model].endswith("| - | - | - |")
    assert rows["Qwen2-0.5B-Instruct"] == "| Qwen2-0.5B-Instruct | - | 77.50 | - | 99.85 |"
    assert "| bloom-1b4-zh | - | 93.65 |" in table2 and "tiny-qwen2" not in table2.split("## ")[0]
    assert "## Memorization ability" in table2 and "kbit gained" in table2
    assert (root / "curves.png").stat().st_size > 0 and (root / "accuracy_by_length.png").stat().st_size > 0

    markdown = report([str(root / "tiny-qwen2-cn-256")], out=tmp_path / "one")[0]
    assert "tiny-qwen2-cn-256" in markdown and (tmp_path / "one" / "report.md").is_file()
    profiled = profile(["tiny-qwen2"], n_poems=4, bench_dir=tmp_path, runs=[root / "tiny-qwen2-cn-256"], out=None)
    assert profiled[0][0]["accuracy"] == pytest.approx(accuracy["tiny-qwen2"])


def test_sweep_checks_every_model_name_before_training(tmp_path):
    with pytest.raises(ValueError, match="sweep: unknown model nosuch: not a folder and not one of .*nothing was trained"):
        sweep(["tiny-qwen2", "nosuch"], ["cn"], [256], out_root=tmp_path / "sweep", epochs=1, poems=2)
    assert not (tmp_path / "sweep").exists()
    with pytest.raises(ValueError, match="--epochs must be at least 1"):
        sweep(["tiny-qwen2"], ["cn"], [256], out_root=tmp_path / "sweep", epochs=0)
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_a_seeds_sweep_aggregates_both_seeds(tmp_path, one_thread):
    import cli
    root = tmp_path / "sweep"
    assert cli.main(["sweep", "--models", "tiny-qwen2", "--seeds", "0,1", "--epochs", "1", "--poems", "4",
                     "--batch-tokens", "512", "--out-root", str(root)]) == 0
    runs = {r["config"]["seed"]: r for r in find_runs([root / "tiny-qwen2-cn-256", root / "tiny-qwen2-cn-256-seed1"])}
    assert sorted(runs) == [0, 1]
    text = (root / "report.md").read_text()
    row = next(line for line in text.split("## Across seeds")[1].splitlines() if line.startswith("| tiny-qwen2"))
    accuracies = [100 * runs[seed]["accuracy"] for seed in (0, 1)]
    assert row.startswith(f"| tiny-qwen2 | cn-256 | 0, 1 | {sum(accuracies) / 2:.2f} ± ")
    assert f"| {min(accuracies):.2f}-{max(accuracies):.2f} |" in row
    pooled = sum(r["correct"] for r in runs.values())
    assert f"| {pooled}/8 |" in text.split("## Memorization ability")[1]       # the ranking pools both seeds
