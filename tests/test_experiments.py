"""engine/experiments.py: profile's numbers against hand computation, sweep and report end to end
on the tiny presets."""
import json
import time

import pytest

from engine.data import default_format, encode_examples, load_poems
from engine.experiments import (ASSUMED_MFU, H100_PEAK_FLOPS, count_parameters, model_config,
                                profile, report, sweep, this_device, train_flops)
from models import PAPER_MODELS, REGISTRY, ModelConfig, load_tokenizer


def hand_count(c: ModelConfig) -> int:
    """The tensors of the config, added up by hand."""
    h, layers, vocab_matrix = c.hidden_size, c.num_layers, c.vocab_size * c.hidden_size
    if c.model_type == "qwen2":
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        block = (h * q + q) + 2 * (h * kv + kv) + q * h + 3 * h * c.intermediate_size + 2 * h
        return vocab_matrix * (1 if c.tie_word_embeddings else 2) + layers * block + h
    inner = c.intermediate_size
    block = 2 * h + (3 * h * h + 3 * h) + (h * h + h) + 2 * h + (h * inner + inner) + (inner * h + h)
    return vocab_matrix + 2 * h + layers * block + 2 * h


@pytest.mark.parametrize("name", ["qwen2-0.5b", "qwen2-1.5b", "qwen1.5-0.5b", "bloom-560m", "bloom-389m-zh",
                                  "tiny-qwen2", "tiny-bloom"])
def test_parameter_count_is_the_sum_of_the_config_tensors(name):
    config = model_config(name)
    assert count_parameters(config) == hand_count(config)


def test_parameter_counts_match_the_published_ones():
    assert count_parameters(model_config("qwen2-0.5b")) == 494_032_768
    assert count_parameters(model_config("bloom-560m")) == 559_214_592


def test_train_flops_formula():
    config = ModelConfig.from_dict({"model_type": "qwen2", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
                                    "num_attention_heads": 4, "intermediate_size": 64, "tie_word_embeddings": False})
    params = count_parameters(config)
    n = params - 100 * 32                      # the untied input embedding is a lookup
    attention = 6 * 2 * 32 * (10 * 11 + 3 * 4)  # 12·L·d per token x mean causal context (s+1)/2
    assert train_flops(config, params, [10, 3]) == 6 * n * 13 + attention


def test_profile_projected_then_measured(tmp_path):
    rows, table = profile(["tiny-qwen2"], n_poems=16, bench_dir=tmp_path, runs=[], out=None)
    row = rows[0]
    tokenizer = load_tokenizer("tiny-qwen2")
    examples = encode_examples(load_poems("cn", 256, 16), tokenizer, "cn", default_format(tokenizer, REGISTRY["tiny-qwen2"].chat))
    assert row["tokens_per_epoch"] == sum(len(e) for e in examples)
    assert row["tokenizer"] == "own" and row["projected"] and "projected" in row["basis"]
    assert row["flops_total"] == 100 * row["flops_per_epoch"]
    assert row["epoch_seconds"] == pytest.approx(row["flops_per_epoch"] / (H100_PEAK_FLOPS * ASSUMED_MFU))
    memory = row["memory"]
    assert memory["weights"] + memory["gradients"] + memory["optimizer"] == 16 * row["parameters"]
    assert "tiny-qwen2" in table

    bench = {"device": this_device(), "peak_tflops": None, "matmul_tflops": None,
             "models": {"tiny-qwen2": {"params": row["parameters"], "train_tokens_per_second": 1000.0, "mfu": None,
                                       "step_seconds": {}, "peak_memory_bytes": 1, "eval_tokens_per_second": 500.0}}}
    (tmp_path / "throughput-here.json").write_text(json.dumps(bench))
    (tmp_path / "throughput-here-detail.json").write_text(json.dumps({"device": this_device(), "models": {}}))
    measured = profile(["tiny-qwen2"], n_poems=16, bench_dir=tmp_path, runs=[], out=None)[0][0]
    assert not measured["projected"] and "measured" in measured["basis"]
    assert measured["epoch_seconds"] == pytest.approx(row["tokens_per_epoch"] / 1000.0)


def test_profile_all_paper_models_quickly(tmp_path):
    start = time.perf_counter()
    rows, table = profile(bench_dir=tmp_path, runs=[], out=tmp_path)
    assert time.perf_counter() - start < 30
    assert [r["model"] for r in rows] == PAPER_MODELS
    assert all(r["projected"] and r["tokenizer"] == "tiny proxy" for r in rows)
    assert rows[2]["parameters"] > rows[1]["parameters"] and rows[2]["flops_per_epoch"] > rows[1]["flops_per_epoch"]
    assert rows[1]["paper_accuracy"] == 77.5 and rows[5]["paper_accuracy"] is None
    assert len(table.splitlines()) >= 2 + len(PAPER_MODELS)
    assert (tmp_path / "profile.png").stat().st_size > 0


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


def test_cli_arguments_round_trip_through_cli_parser():
    from cli import parser
    from engine.experiments import cli_arguments
    from engine.train import TrainConfig
    config = TrainConfig(model="tiny-qwen2", lang="cn", length=512, epochs=3, batch_tokens=2048, lr=1e-3,
                         out="runs/x", resume=True)
    args = parser().parse_args(cli_arguments(config))
    assert (args.model, args.lang, args.length, args.epochs, args.batch_tokens, args.lr, args.out, args.resume) == \
        ("tiny-qwen2", "cn", 512, 3, 2048, 1e-3, "runs/x", True)
