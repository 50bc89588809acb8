"""bench/gpu.sh fits a GPU lease and runs: its step limits sum to at most 540 s, and
`bash bench/gpu.sh --dry-run` runs every step on the CPU at tiny sizes, so an import, path or
argument error in a benchmark shows here rather than on the GPU. Plus bench/common.py's helpers."""
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from bench import common

REPO = Path(__file__).resolve().parent.parent
GPU_SH = REPO / "bench" / "gpu.sh"
STEPS = ["tests", "train", "generate", "attention", "loss_optim", "kernels"]   # most valuable first
CPU_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}


def step_limits() -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"^step (\S+) (\d+) ", GPU_SH.read_text(), re.M)}


def test_step_limits_fit_a_lease():
    limits = step_limits()
    assert list(limits) == STEPS
    assert sum(limits.values()) <= 540, limits
    assert limits["tests"] + limits["train"] + limits["generate"] <= 300, limits   # the most valuable first
    assert "timeout -s INT" in GPU_SH.read_text() and "-rfE --tb=short" in GPU_SH.read_text()


def test_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(GPU_SH), "--dry-run", str(out)], env=CPU_ENV, capture_output=True, text=True,
                          timeout=1200)
    summary = (out / "summary.log").read_text()
    assert done.returncode == 0, summary + done.stdout[-3000:] + done.stderr[-2000:]
    assert [line.split()[0] for line in summary.splitlines()] == STEPS
    assert len(list(out.iterdir())) <= 8                   # what the device tool brings back
    with tarfile.open(out / "results.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
        tests_log = tar.extractfile("logs/tests.log").read().decode()
        throughput = json.load(tar.extractfile("results/throughput-cpu.json"))
    for kind in ["throughput", "generate", "attention", "loss_optim", "kernels"]:
        assert {f"{kind}-cpu.json", f"{kind}-cpu.md"} <= names, kind
    assert re.search(r"\b\d+ passed\b", tests_log) and "skipped" not in tests_log, tests_log[-2000:]
    assert throughput["models"]["tiny-qwen2"]["train_tokens_per_second"] > 0


@pytest.mark.parametrize("script", ["bench_attention.py", "bench_kernels.py", "bench_loss_optim.py"])
def test_gpu_benchmarks_refuse_a_cpu_in_one_line(script):
    done = subprocess.run([sys.executable, str(REPO / "bench" / script)], env=CPU_ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    assert "error: " in done.stderr and "--dry-run" in done.stderr and "Traceback" not in done.stderr


def test_timer_and_results(tmp_path):
    timer = common.Timer(torch.device("cpu"), warmup=1, reps=3)
    calls = []
    assert timer.median_ms(lambda: calls.append(1)) >= 0 and len(calls) == 4
    name = common.stem("kernels", "NVIDIA H200 (x/y)")
    assert name == "kernels-NVIDIA-H200-x-y"
    md = "\n".join(common.table(["a", "b"], [[1, 2.5]], "lr")) + "\n"
    path = common.write_results(tmp_path, name, {"rows": [1]}, md)
    assert json.loads(path.with_name(name + ".json").read_text()) == {"rows": [1]}
    assert path.with_name(name + ".md").read_text() == "| a | b |\n| --- | ---: |\n| 1 | 2.5 |\n"


def test_guarded_keeps_a_gpu_run_going_and_raises_in_a_dry_run():
    def broken():
        raise ValueError("no such shape")
    assert common.guarded(broken, strict=False) == {"status": "error: ValueError: no such shape"}
    with pytest.raises(ValueError):
        common.guarded(broken, strict=True)


def test_bench_exits_2_with_a_line_per_failed_model(tmp_path, monkeypatch, capsys):
    """The transformers side failing: each model's error line, the partial table still written, exit 2."""
    from bench import throughput
    from bench.transformers_side import TransformersSide
    monkeypatch.setattr(throughput.Settings, "for_device", classmethod(lambda cls, *a: cls(256, 0, 1, 1, 2, 2, 1)))

    def broken(self, op, *args, **kwargs):
        raise RuntimeError(f"transformers side, {op}(): ImportError: broken install")
    monkeypatch.setattr(TransformersSide, "call", broken)
    assert throughput.main(["--quick", "--models", "tiny-qwen2", "tiny-bloom", "--out", str(tmp_path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {m}: RuntimeError: transformers side, train(): ImportError: broken install"
                      for m in ("tiny-qwen2", "tiny-bloom")]
    assert json.loads((tmp_path / "throughput-cpu-detail.json").read_text())["errors"].keys() == {"tiny-qwen2",
                                                                                                   "tiny-bloom"}
    # what was measured before the failure stays: our training and evaluation, as partial rows
    result = json.loads((tmp_path / "throughput-cpu.json").read_text())
    assert result["models"] == {} and result["partial"].keys() == {"tiny-qwen2", "tiny-bloom"}
    assert all(m["eval_tokens_per_second"] > 0 and "baseline" not in m for m in result["partial"].values())


def test_a_model_cut_at_the_step_limit_leaves_its_partial_row(tmp_path, monkeypatch):
    """gpu.sh's timeout interrupts (SIGINT) a model during its evaluation: the files already hold its
    training numbers and its measured / modeled split (modeled on H100 ceilings here, as on a GPU)."""
    from bench import throughput
    from kernels.hardware import PROJECTION
    monkeypatch.setattr(throughput.Settings, "for_device", classmethod(lambda cls, *a: cls(256, 0, 1, 1, 2, 2, 1)))
    monkeypatch.setattr(throughput.common, "hardware", lambda device: PROJECTION)

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(throughput, "eval_ours", interrupted)
    with pytest.raises(KeyboardInterrupt):
        throughput.main(["--quick", "--models", "tiny-qwen2", "--out", str(tmp_path)])
    stem = tmp_path / "throughput-cpu"
    entry = json.loads(stem.with_suffix(".json").read_text())["partial"]["tiny-qwen2"]
    assert entry["train_tokens_per_second"] > 0 and "eval_tokens_per_second" not in entry
    assert entry["modeled_step_seconds"].keys() == entry["step_seconds"].keys() == {"forward", "backward", "optimizer"}
    table = stem.with_suffix(".md").read_text()
    assert "| tiny-qwen2 (partial) |" in table and "Measured / modeled ms" in table


def test_results_go_to_the_users_folder_by_default():
    assert common.parser("x").parse_args([]).out == Path("runs") / "bench"
