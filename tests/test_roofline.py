"""engine/roofline.py: the speed-of-light model's phases come from the code's own plans."""
import pytest
import torch

from engine.costs import model_config
from engine.optim import step_traffic
from engine.roofline import layer_linears, roofline_table, stage_seconds, summary, train_step_phases
from kernels.hardware import PROJECTION
from kernels.linear_cross_entropy import chunk_plan, traffic


def test_layer_gemm_flops_are_6_per_weight_per_token():
    c = model_config("qwen2-0.5b")
    gemms = next(p for p in train_step_phases(c, tokens=1000) if p.name == "layer GEMMs")
    weights = sum(i * o for i, o in layer_linears(c))
    assert gemms.flops == 6 * 1000 * weights
    assert len(layer_linears(c)) == 4 * c.num_layers     # qkv (fused), o, gate_up (fused), down
    assert (c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim) in layer_linears(c)
    assert (c.hidden_size, 2 * c.intermediate_size) in layer_linears(c)


def test_phase_time_is_the_slower_ceiling():
    c = model_config("qwen2-0.5b")
    for p in train_step_phases(c):
        assert p.seconds >= max(p.flops / PROJECTION.roofline_matmul_flops, p.bytes / PROJECTION.roofline_bytes_per_second) * 0.999


def test_loss_and_optimizer_bytes_follow_their_plans():
    c = model_config("qwen2-0.5b")
    phases = {p.name: p for p in train_step_phases(c)}
    assert phases["LM head + loss"].bytes == sum(traffic(8192, c.hidden_size, c.vocab_size, torch.bfloat16).values())
    # a smaller logits budget: more chunks, more bytes
    small = sum(traffic(8192, c.hidden_size, c.vocab_size, torch.bfloat16, budget_bytes=64 << 20).values())
    assert chunk_plan(8192, c.hidden_size, c.vocab_size, torch.bfloat16, 64 << 20).chunk_tokens < \
        chunk_plan(8192, c.hidden_size, c.vocab_size, torch.bfloat16).chunk_tokens
    assert small > phases["LM head + loss"].bytes
    n = summary("qwen2-0.5b", c)["phases"]
    assert any(p.name == "optimizer" for p in n)
    with torch.device("meta"):
        from models import model_class
        params = model_class(c)(c).num_parameters()
    assert phases["optimizer"].bytes == sum(step_traffic(params, 2).values())


def test_table_names_every_model_and_its_largest_phases():
    table = roofline_table(["qwen2-0.5b", "bloom-1b4-zh"])
    assert "qwen2-0.5b" in table and "bloom-1b4-zh" in table and "layer GEMMs" in table


def test_stage_split_sums_to_the_step():
    """The forward / backward / optimizer split bench/throughput.py prints next to its measured one."""
    for name in ("qwen2-0.5b", "bloom-1b4-zh"):
        c = model_config(name)
        split = stage_seconds(c, 4096, 100)
        assert abs(sum(split.values()) - sum(p.seconds for p in train_step_phases(c, 4096, 100))) < 1e-12
        assert split["forward"] > 0 and split["backward"] > split["optimizer"] > 0


def test_the_output_layer_runs_on_the_target_rows_only():
    c = model_config("qwen2-0.5b")
    head = lambda share: next(p for p in train_step_phases(c, 8192, target_share=share) if p.name == "LM head + loss")
    whole, chat = head(1.0), head(0.44)
    assert chat.flops == pytest.approx(0.44 * whole.flops, rel=1e-3)       # the three vocabulary GEMMs
    assert chat.bytes < 0.6 * whole.bytes
    assert summary("qwen2-0.5b", c)["step_seconds"] < summary("qwen2-0.5b-folder", c)["step_seconds"]   # chat < plain
