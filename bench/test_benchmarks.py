"""pytest-benchmark suite: every op (ours and torch eager; forward, backward), the fused loss and AdamW, and one
training step and one decode step per tiny preset.

    python -m pytest bench --benchmark-only                        # times everything
    python -m pytest bench --benchmark-only --benchmark-autosave   # keeps .benchmarks/<machine>/NNNN_<commit>.json
    python -m pytest bench --benchmark-only --benchmark-compare    # against the last saved run: a regression shows

Shapes and implementations come from the bench scripts (bench_kernels.cases / implementations,
bench_loss_optim.loss_impls / loss_inputs): on the CPU their --dry-run shapes (the tiny presets') plus one odd
and one real-width shape; on a GPU their quick real shapes. On the CPU "ours" is what dispatch runs there (the
torch references; the Triton kernels run only on CUDA), so CPU numbers compare commits, not kernels.
`python -m pytest -q -n 2 tests` does not collect this folder.
"""
from __future__ import annotations

import pytest
import torch

from bench import bench_kernels, bench_loss_optim
from bench.bench_kernels import Case

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
ODD = [Case("rms_norm", "T=37 H=129 (odd)", [((37, 129), 1.0), ((129,), 1.0)], (0, 0)),
       Case("swiglu", "T=37 I=4864 (odd T)", [((37, 2 * 4864), 2.0)], (0, 0))]
CASES = bench_kernels.cases(quick=True, dry_run=not CUDA) + ([] if CUDA else ODD)
IMPLS = bench_kernels.implementations(compile_peers=False)
LOSS_SHAPES = [(512, 896, 151936)] if CUDA else [(40, 64, 4096), (37, 96, 1003)]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def timed(benchmark, fn):
    """fn timed by pytest-benchmark, the device synchronized inside each call."""
    benchmark.pedantic(lambda: (fn(), _sync()), rounds=5 if CUDA else 3, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("mode", ["forward", "backward"])
@pytest.mark.parametrize("impl", ["ours", "torch_eager"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}[{c.shape}]")
def test_op(benchmark, case, impl, mode):
    torch.manual_seed(0)
    inputs = case.make(DTYPE, DEVICE)
    benchmark.group = f"{case.op} {case.shape} {mode}"
    timed(benchmark, bench_kernels.mode_fn(IMPLS[case.op][impl], inputs, mode))


@pytest.mark.parametrize("impl", ["ours", "torch_eager"])
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=lambda s: "T={} H={} V={}".format(*s))
def test_linear_cross_entropy(benchmark, shape, impl):
    h, w, y = bench_loss_optim.loss_inputs(*shape, DEVICE, DTYPE)
    benchmark.group = f"linear_cross_entropy {shape} forward+backward"
    timed(benchmark, bench_loss_optim.fwd_bwd(bench_loss_optim.loss_impls(compile_peers=False)[impl], h, w, y))


@pytest.mark.parametrize("n", [4097, 1 << 20])
def test_adamw_step(benchmark, n):
    from engine.optim import AdamW
    p = torch.nn.Parameter(torch.randn(n, device=DEVICE))
    opt = AdamW([p], lr=1e-3)

    def step():
        p.grad.normal_()
        opt.step(max_grad_norm=1.0)
    benchmark.group = f"AdamW step n={n}"
    timed(benchmark, step)


def _tiny(preset: str):
    from engine.data import encode_examples, load_poems
    from engine.packing import pack
    from engine.train import plan_steps
    from models import load_model, load_tokenizer
    model, tok = load_model(preset, device=DEVICE, dtype=DTYPE), load_tokenizer(preset)
    examples = encode_examples(load_poems("cn", 256, 16, 0), tok, "cn", "plain")
    return model, examples, plan_steps(pack(examples, 256, 0, 0), 256)


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-bloom"])
def test_train_step(benchmark, preset):
    from engine.optim import AdamW, parameter_groups
    from engine.train import train_step
    model, _, steps = _tiny(preset)
    opt = AdamW(parameter_groups(model, 0.01), lr=1e-4)
    step = steps[0]
    n = sum(b.num_target_tokens for b in step)
    benchmark.group = f"{preset} training step"
    timed(benchmark, lambda: train_step(model, opt, step, n, DEVICE, 1.0))


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-bloom"])
def test_decode_step(benchmark, preset):
    from models import KVCache
    model, examples, _ = _tiny(preset)
    batch, context = 8, 64
    cache = KVCache(model.config, batch, context + 1, DEVICE, DTYPE)
    ids = torch.tensor([e.prompt_ids[0] for e in examples[:batch]], device=DEVICE)
    positions = torch.full((batch,), context, device=DEVICE)
    slots = torch.arange(batch, device=DEVICE)

    @torch.inference_mode()
    def step():
        model.greedy_tokens(model.decode_step(ids, positions, cache, slots, return_hidden=True))
    benchmark.group = f"{preset} decode step (batch {batch}, {context} cached)"
    timed(benchmark, step)
