"""Fused AdamW step (Triton, interpreted) against torch.optim.AdamW over several steps."""
import pytest
import torch

import kernels
from kernels.adamw import adamw_step

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8)
SIZES = [(1000,), (3, 7), (70001,)]  # odd sizes; the last spans two interpreted programs


def run_torch(params, grads_per_step, weight_decay):
    params = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.AdamW(params, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                            weight_decay=weight_decay)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.float()
        opt.step()
    return [p.detach() for p in params], [opt.state[p]["exp_avg"] for p in params], \
        [opt.state[p]["exp_avg_sq"] for p in params]


def run_fused(params, grads_per_step, weight_decay, param_dtype=None):
    masters = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    model = None if param_dtype is None else [torch.full_like(p, float("nan"), dtype=param_dtype) for p in params]
    with kernels.backend("triton"):
        for step, grads in enumerate(grads_per_step, start=1):
            adamw_step(masters, grads, m, v, model, step=step, weight_decay=weight_decay, **HYPER)
    return masters, m, v, model


def make_run(steps, grad_dtype):
    params = [torch.randn(s) for s in SIZES]
    grads = [[torch.randn(s).to(grad_dtype) for s in SIZES] for _ in range(steps)]
    return params, grads


@pytest.mark.parametrize("steps, dtype, weight_decay", [(4, torch.float32, 0.0), (4, torch.float32, 0.1),
                                                         (3, torch.bfloat16, 0.1)])
def test_matches_torch_adamw(steps, dtype, weight_decay):
    """fp32 masters and moments as torch's; with bf16 gradients, the bf16 model copy too."""
    params, grads = make_run(steps, dtype)
    ref_p, ref_m, ref_v = run_torch(params, grads, weight_decay)
    masters, m, v, model = run_fused(params, grads, weight_decay, param_dtype=None if dtype == torch.float32 else dtype)
    for a, b in zip(masters + m + v, ref_p + ref_m + ref_v):
        assert (a - b).abs().max() <= 1e-6
    for p, master in zip(model or [], masters):
        # the interpreter truncates fp32 -> bf16 stores (the GPU rounds): within one bf16 ulp
        assert p.dtype == torch.bfloat16 and not p.isnan().any()
        assert ((p.float() - master).abs() <= master.abs() * 2 ** -7).all()


def test_rejects_mismatched_tensors():
    masters, grads = [torch.zeros(10)], [torch.zeros(11)]
    with kernels.backend("triton"), pytest.raises(ValueError, match="contiguous"):
        adamw_step(masters, grads, [torch.zeros(10)], [torch.zeros(10)], step=1, weight_decay=0.0, **HYPER)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_clip_scale_and_zeroing_in_the_pass_match_torch_clip_then_adamw(backend):
    """grad_scale and zero_grads: the update torch.nn.utils.clip_grad_norm_ + torch.optim.AdamW make
    (odd sizes, clipping active), and the gradients left zero."""
    params, grads = make_run(2, torch.float32)
    grads = [[g * 5 for g in step] for step in grads]
    ref = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.AdamW(ref, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                            weight_decay=0.1)
    masters = [p.clone() for p in params]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    for step, step_grads in enumerate(grads, start=1):
        for p, g in zip(ref, step_grads):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        opt.step()
        ours = [g.clone() for g in step_grads]
        norm = torch.stack([g.norm() for g in ours]).norm()
        scale = (1.0 / (norm + 1e-6)).clamp(max=1.0).reshape(1)
        assert scale.item() < 0.5
        with kernels.backend(backend):
            adamw_step(masters, ours, m, v, step=step, weight_decay=0.1, grad_scale=scale, zero_grads=True, **HYPER)
        assert all((g == 0).all() for g in ours)
    for a, b in zip(masters, ref):
        assert (a - b.detach()).abs().max() <= 1e-6
