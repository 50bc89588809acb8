"""The hand-written AdamW against torch.optim.AdamW, clipping against clip_grad_norm_."""
import pytest
import torch

from engine.optim import AdamW, lr_at, parameter_groups
from models import load_model

SHAPES = [(7, 5), (13,), (3, 4, 2), (1,)]


def twin_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, ref


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_equals_torch_over_50_steps(weight_decay):
    ours, ref = twin_params()
    opt = AdamW([{"params": ours[:2]}, {"params": ours[2:], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95),
                eps=1e-8, weight_decay=weight_decay)
    ref_opt = torch.optim.AdamW([{"params": ref[:2]}, {"params": ref[2:], "weight_decay": 0.0}], lr=1e-2,
                                betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay, foreach=False)
    g = torch.Generator().manual_seed(1)
    for step in range(50):
        grads = [torch.randn(p.shape, generator=g) * (step + 1) for p in ours]
        for p, r, grad in zip(ours, ref, grads):
            p.grad.copy_(grad)
            r.grad = grad.clone()
        lr = 1e-2 * (0.5 + step / 50)
        opt.set_lr(lr)
        for group in ref_opt.param_groups:
            group["lr"] = lr
        opt.step()
        ref_opt.step()
    for p, r in zip(ours, ref):
        assert (p - r).abs().max().item() <= 1e-6


def test_clip_equals_torch():
    ours, ref = twin_params()
    opt = AdamW(ours, lr=1e-3)
    for p, r in zip(ours, ref):
        grad = torch.randn(p.shape) * 3
        p.grad.copy_(grad)
        r.grad = grad.clone()
    for max_norm in (1e9, 0.5):
        norm = opt.clip_grad_norm_(max_norm)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        assert torch.allclose(norm, ref_norm, rtol=1e-6)
        for p, r in zip(ours, ref):
            assert torch.allclose(p.grad, r.grad, rtol=1e-6, atol=1e-7)


def test_bf16_model_keeps_fp32_masters():
    p = torch.nn.Parameter(torch.randn(10).bfloat16())
    opt = AdamW([p], lr=1e-3, weight_decay=0.0)
    start = opt.groups[0].master.clone()
    p.grad.fill_(1.0)
    for _ in range(3):
        opt.step()
    master = opt.groups[0].master
    assert master.dtype == torch.float32 and torch.allclose(master, start - 3e-3, atol=1e-5)
    assert torch.equal(p.detach(), master.bfloat16())


def test_state_dict_round_trip():
    ours, _ = twin_params()
    opt = AdamW(ours, lr=1e-2)
    for _ in range(3):
        for p in ours:
            p.grad.normal_()
        opt.step()
    state = opt.state_dict()
    copies, _ = twin_params()
    for c, p in zip(copies, ours):
        c.data.copy_(p.detach())
    other = AdamW(copies, lr=1e-2)
    other.load_state_dict(state)
    for a, b in ((opt, ours), (other, copies)):
        for p in b:
            p.grad.fill_(0.3)
        a.step()
    for p, c in zip(ours, copies):
        assert torch.equal(p, c)
    with pytest.raises(ValueError, match="does not match"):
        AdamW(copies[:2], lr=1e-2).load_state_dict(state)


def test_no_decay_policy():
    model = load_model("tiny-qwen2")
    decay, no_decay = parameter_groups(model, 0.1)
    embedding = model.model.embed_tokens.weight
    assert any(p is embedding for p in no_decay["params"])
    assert all(p.dim() == 2 and p is not embedding for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"] if p is not embedding)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_schedule():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(55, 100, 1.0, 10, "constant") == 1.0
    with pytest.raises(ValueError, match="unknown LR schedule"):
        lr_at(20, 100, 1.0, 10, "linear")
