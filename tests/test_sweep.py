"""engine/sweep.py and engine/report.py: a sweep and the paper's tables end to end on the tiny presets
(the sweep's subprocess flags: tests/test_config.py)."""
import pytest

from engine.costs import profile
from engine.report import report
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
        assert rows[model].startswith(f"| {model} | {accuracy[model]:.2f} | - | - | - |")
    assert rows["Qwen2-0.5B-Instruct"] == "| Qwen2-0.5B-Instruct | - | 77.50 | - | 99.85 |"
    assert "| bloom-1b4-zh | - | 93.65 |" in table2 and "tiny-qwen2" not in table2.split("## Cost")[0]
    assert (root / "curves.png").stat().st_size > 0 and (root / "accuracy_by_length.png").stat().st_size > 0

    markdown = report([str(root / "tiny-qwen2-cn-256")], out=tmp_path / "one")
    assert "tiny-qwen2-cn-256" in markdown and (tmp_path / "one" / "report.md").is_file()
    profiled = profile(["tiny-qwen2"], n_poems=4, bench_dir=tmp_path, runs=[root / "tiny-qwen2-cn-256"], out=None)
    assert profiled[0][0]["accuracy"] == pytest.approx(accuracy["tiny-qwen2"])
