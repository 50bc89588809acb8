"""engine/costs.py: parameter counts, FLOPs and profile numbers against hand computation."""
import json
import time

import pytest
import torch

from engine.costs import (CARD_MIB, count_parameters, memory_per_rank, memory_split, model_config, profile,
                          smallest_world, this_device, train_flops, unit_parameters)
from engine.data import default_format, encode_examples, load_poems
from models import PAPER_MODELS, REGISTRY, ModelConfig, load_tokenizer, model_class


def tiny_token_counts(n_poems: int, seed: int = 0) -> list[int]:
    """Tokens of each of n_poems CN poems in tiny-qwen2's own format, as profile encodes them."""
    tokenizer = load_tokenizer("tiny-qwen2")
    fmt = default_format(tokenizer, REGISTRY["tiny-qwen2"].chat)
    return [len(e) for e in encode_examples(load_poems("cn", 256, n_poems, seed), tokenizer, "cn", fmt)]


def hand_count(config: ModelConfig) -> int:
    """The tensors of the config, added up by hand."""
    h, layers, vocab_matrix = config.hidden_size, config.num_layers, config.vocab_size * config.hidden_size
    if config.model_type == "qwen2":
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        block = (h * q + q) + 2 * (h * kv + kv) + q * h + 3 * h * config.intermediate_size + 2 * h
        return vocab_matrix * (1 if config.tie_word_embeddings else 2) + layers * block + h
    inner = config.intermediate_size
    block = 2 * h + (3 * h * h + 3 * h) + (h * h + h) + 2 * h + (h * inner + inner) + (inner * h + h)
    return vocab_matrix + 2 * h + layers * block + 2 * h


@pytest.mark.parametrize("name", ["qwen2-0.5b", "qwen2-1.5b", "qwen1.5-0.5b", "bloom-560m", "bloom-389m-zh",
                                  "tiny-qwen2", "tiny-bloom", "qwen2.5-3b", "qwen2.5-7b"])
def test_parameter_count_is_the_sum_of_the_config_tensors(name):
    config = model_config(name)
    assert count_parameters(config) == hand_count(config)


def test_parameter_counts_match_the_published_ones():
    assert count_parameters(model_config("qwen2-0.5b")) == 494_032_768
    assert count_parameters(model_config("bloom-560m")) == 559_214_592
    assert count_parameters(model_config("qwen2.5-7b")) == 7_615_616_512      # the model card's 7.61B


@pytest.mark.parametrize("name", ["qwen2-0.5b", "qwen2.5-7b"])
def test_memory_per_rank_shards_the_state_and_keeps_what_each_rank_must_hold(name):
    config = model_config(name)
    params = count_parameters(config)
    block, root = unit_parameters(config, params)
    assert config.num_layers * block + root == params and 0 < block < params
    assert memory_per_rank(config, params, 4096, 1) == memory_split(config, params, 4096)
    one, two, eight = (memory_per_rank(config, params, 4096, n) for n in (1, 2, 8))
    # the sharded state (fp32 weights, gradients, two moments) is 16 bytes a parameter over N ranks
    state = lambda m, n: m["total"] - m["activations"] - (2 * params if params <= 3e9 else 2 * (2 * block + root)) \
        - 6 * max(block, root)
    assert state(two, 2) == pytest.approx(16 * params / 2) and state(eight, 8) == pytest.approx(16 * params / 8)
    assert one["activations"] == two["activations"] == eight["activations"]
    assert eight["total"] < two["total"]


def test_the_fewest_ranks_that_fit_a_card():
    small, large = (model_config(name) for name in ("qwen2-0.5b", "qwen2.5-7b"))
    h100 = CARD_MIB["H100 80GB"]
    assert smallest_world(small, count_parameters(small), 8192, h100) == 1
    n = smallest_world(large, count_parameters(large), 2048, h100)
    assert n > 1 and memory_per_rank(large, count_parameters(large), 2048, n)["total"] <= 0.9 * h100 * 2 ** 20
    assert memory_per_rank(large, count_parameters(large), 2048, n // 2)["total"] > 0.9 * h100 * 2 ** 20


def test_train_flops_counts_every_matmul_of_every_token():
    """Token by token: a forward is 2 FLOPs per weight (6N counts norms and biases as weights too)
    and, per layer and head, q·k and p·v over the keys up to the token; backward twice the forward."""
    config = ModelConfig.from_dict({"model_type": "qwen2", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
                                    "num_attention_heads": 4, "intermediate_size": 64, "tie_word_embeddings": False})
    with torch.device("meta"):
        model = model_class(config)(config)
    weights = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)   # a lookup
    forward = [2 * weights + config.num_layers * config.num_heads * 2 * (2 * config.head_dim) * (position + 1)
               for length in (10, 3) for position in range(length)]
    assert train_flops(config, count_parameters(config), [10, 3]) == 3 * sum(forward)


def test_profile_projected_then_measured(tmp_path):
    rows, table = profile(["tiny-qwen2"], n_poems=16, bench_dir=tmp_path, runs=[], out=None)
    row = rows[0]
    assert row["tokens_per_epoch"] == sum(tiny_token_counts(16))
    assert row["tokenizer"] == "own" and row["projected"] and "projected" in row["basis"]
    assert row["flops_total"] == 100 * row["flops_per_epoch"]
    assert row["epoch_seconds"] == pytest.approx(row["flops_per_epoch"] / (989e12 * 0.40))    # H100 bf16 at 40%
    memory = row["memory"]
    config = REGISTRY["tiny-qwen2"].config          # bf16 weights, fp32 main_grad + one bf16 embedding grad, AdamW
    assert memory["weights"] + memory["gradients"] + memory["optimizer"] == \
        18 * row["parameters"] + 2 * config["vocab_size"] * config["hidden_size"]
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


def finished_run(folder, seed: int, correct: int, bits_gained: float) -> str:
    """A finished tiny-qwen2 run's results.json, as memorize writes it (the fields profile reads)."""
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({
        "model": "tiny-qwen2", "lang": "cn", "length": 256, "n_poems": 4, "epochs": 3, "correct": correct, "n": 4,
        "accuracy": correct / 4, "train_seconds": 10.0, "eval_seconds": 2.0, "score_seconds": 1.0,
        "config": {"seed": seed, "source": None},
        "memorization": {"bits_gained": bits_gained, "bits_per_parameter": bits_gained / 1e6}}))
    return str(folder)


def test_information_view_from_runs_pools_seeds_and_projects_without_one(tmp_path):
    runs = [finished_run(tmp_path / "a", 0, 2, 3000.0), finished_run(tmp_path / "b", 1, 3, 5000.0)]
    rows, table = profile(["tiny-qwen2", "qwen2-0.5b"], n_poems=16, bench_dir=tmp_path, runs=runs, out=None)
    ours, projected = rows
    config = model_config("tiny-qwen2")
    flops = sum(3 * train_flops(config, count_parameters(config), tiny_token_counts(4, seed)) for seed in (0, 1))
    assert ours["accuracy"] == 100 * 5 / 8 and ours["seeds"] == 2 and ours["kbit_gained"] == 8.0
    assert ours["flops_per_poem"] == pytest.approx(flops / 5) and ours["flops_per_kbit"] == pytest.approx(flops / 8)
    assert ours["gpu_seconds_per_poem"] == 26.0 / 5 and ours["gpu_seconds_per_kbit"] == 26.0 / 8
    assert ours["bits_per_parameter"] == pytest.approx(0.004)
    assert projected["cost_basis"].startswith("projected")
    assert projected["flops_per_poem"] == pytest.approx(projected["flops_total"] / (0.775 * 16))
    assert projected["gpu_seconds_per_poem"] == pytest.approx(projected["gpu_hours"] * 3600 / (0.775 * 16))
    assert "flops_per_kbit" not in projected and "Information view" in table
