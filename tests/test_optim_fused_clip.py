"""AdamW.step(max_grad_norm): clipping folded into the update's pass equals clip_grad_norm_ then step()."""
import torch

from engine.optim import AdamW, step_traffic
from kernels.adamw import bytes_per_element


def test_step_with_max_norm_equals_clip_then_step():
    torch.manual_seed(1)
    shapes = [(7, 5), (13,), (3, 4, 2)]
    a = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a, opt_b = AdamW(a, lr=1e-2), AdamW(b, lr=1e-2)
    for _ in range(3):
        for p, q in zip(a, b):
            g = torch.randn(p.shape) * 4
            p.grad.copy_(g)
            q.grad.copy_(g)
        norm_a = opt_a.clip_grad_norm_(0.7)
        opt_a.step()
        norm_b = opt_b.step(max_grad_norm=0.7)
        assert torch.allclose(norm_a, norm_b, rtol=1e-6) and norm_b > 0.7
        for p, q in zip(a, b):
            assert torch.allclose(p, q, rtol=0, atol=1e-7)
        assert all((g.grad == 0).all() for g in opt_b.groups)


def test_step_traffic_counts_the_passes():
    """fp32 model: the norm's read and the fused pass (g read + zeroed, master/m/v read + written)."""
    assert sum(step_traffic(10, 4).values()) == 10 * (4 + 8 + 24)
    # bf16 model: the hooks' add (bf16 read, fp32 read + write) and the bf16 copy written
    assert sum(step_traffic(10, 2).values()) == 10 * (10 + 4 + bytes_per_element(4, 2, True))
