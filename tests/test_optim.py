"""The hand-written AdamW against torch.optim.AdamW, clipping against clip_grad_norm_, the
gradient semantics (assigned, re-created and lost .grad) and the fp32 gradient accumulator."""
import pytest
import torch

import engine.optim
from engine.optim import AdamW, GradientError, lr_at, parameter_groups
from kernels.attention import cu_seqlens
from models import load_model
from models.registry import REGISTRY
from tests.helpers import rel_err, tiny_model

SHAPES = [(7, 5), (13,), (3, 4, 2), (1,)]
VOCAB = REGISTRY["tiny-qwen2"].config["vocab_size"]


def twin_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, ref


def sequences(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


def loss_of(model, seqs, n_targets):
    """model.loss over the sequences packed into one micro-batch, normalized by the step's targets."""
    ids = torch.cat(seqs)
    cu = cu_seqlens([len(s) for s in seqs])
    labels = ids.roll(-1)
    labels[cu[1:].long() - 1] = -100
    return model.loss(ids, labels, cu, reduction="sum") / n_targets


def gradient(model, opt, micro_batches, n_targets):
    """The fp32 buffers' gradient after one backward per micro-batch (a list of sequences each),
    which opt.zero_grad() then discards."""
    for seqs in micro_batches:
        loss_of(model, seqs, n_targets).backward()
    grad = torch.cat([g.grad.clone() for g in opt.groups])
    opt.zero_grad()
    return grad


@pytest.mark.parametrize("chunk", [None, 5])      # 5: the CPU step in several slices, the last one short
@pytest.mark.parametrize("assign", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_equals_torch_over_50_steps(weight_decay, assign, chunk, monkeypatch):
    """assign: `p.grad = g` as torch.optim users do; else written into the buffer views."""
    if chunk:
        monkeypatch.setattr(engine.optim, "CPU_STEP_ELEMENTS", chunk)
    ours, ref = twin_params()
    opt = AdamW([{"params": ours[:2]}, {"params": ours[2:], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95),
                eps=1e-8, weight_decay=weight_decay)
    ref_opt = torch.optim.AdamW([{"params": ref[:2]}, {"params": ref[2:], "weight_decay": 0.0}], lr=1e-2,
                                betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay, foreach=False)
    g = torch.Generator().manual_seed(1)
    for step in range(50):
        grads = [torch.randn(p.shape, generator=g) * (step + 1) for p in ours]
        for p, r, grad in zip(ours, ref, grads):
            if assign:
                p.grad = grad.clone()
            else:
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


def test_step_consumes_the_gradients():
    ours, _ = twin_params()
    opt = AdamW(ours, lr=1e-2)
    for p in ours:
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(p.grad is p.main_grad and not p.grad.any() for p in ours)
    assert not any(g.grad.any() for g in opt.groups)


@pytest.mark.parametrize("zeroing", ["model.zero_grad", "opt.zero_grad", "none"])
def test_training_loops_written_for_torch_optim_train_the_same(zeroing, one_thread):
    """model.zero_grad() (grads set to None) + backward, our zero_grad, or no zeroing at all (step()
    consumes): 5 steps of a tiny model equal torch.optim.AdamW's with zero_grad(set_to_none=True)."""
    model, ref_model = tiny_model(), tiny_model()
    opt = AdamW(parameter_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.95))
    ref_opt = torch.optim.AdamW(parameter_groups(ref_model, 0.1), lr=1e-2, betas=(0.9, 0.95), foreach=False)
    for step in range(5):
        seqs = sequences([17, 30, 9], seed=step)
        if zeroing == "model.zero_grad":
            model.zero_grad()
        elif zeroing == "opt.zero_grad":
            opt.zero_grad()
        loss_of(model, seqs, 53).backward()
        opt.step()
        ref_opt.zero_grad()
        loss_of(ref_model, seqs, 53).backward()
        ref_opt.step()
    for (name, p), r in zip(model.named_parameters(), ref_model.parameters()):
        assert (p - r).abs().max().item() <= 1e-5, name


def test_model_zero_grad_mid_accumulation_discards_like_torch(one_thread):
    model = tiny_model()
    opt = AdamW(parameter_groups(model, 0.0), lr=1e-2)
    loss_of(model, sequences([20, 11], seed=1), 29).backward()
    model.zero_grad()
    ours = gradient(model, opt, [sequences([14, 25], seed=2)], 37)
    assert torch.equal(ours, gradient(model, opt, [sequences([14, 25], seed=2)], 37))


def test_a_lost_gradient_is_an_error():
    ours, _ = twin_params()
    opt = AdamW(ours, lr=1e-2)
    for p in ours:
        p.grad = torch.ones_like(p)
    ours[2].grad = None
    with pytest.raises(GradientError, match=r"parameter 2 of optimizer group 0 \(shape \[3, 4, 2\]\) has no grad"):
        opt.step()
    with pytest.raises(GradientError, match="has no gradient"):
        opt.clip_grad_norm_(1.0)
    opt.zero_grad()                 # gives every parameter its buffer view back
    opt.step()


def test_a_moved_parameter_is_an_error():
    ours, _ = twin_params()
    opt = AdamW(ours, lr=1e-2)
    ours[1].data = ours[1].data.clone()
    with pytest.raises(GradientError, match="no longer lives in the optimizer's buffer"):
        opt.step()


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


def test_bf16_model_keeps_fp32_masters_and_gradients():
    p = torch.nn.Parameter(torch.randn(10).bfloat16())
    opt = AdamW([p], lr=1e-3, weight_decay=0.0)
    start = opt.groups[0].master.clone()
    assert p.grad is None and p.main_grad.dtype == torch.float32
    for _ in range(3):
        p.grad = torch.ones_like(p)         # assigned bf16 gradients land in the fp32 buffer
        opt.step()
        assert p.grad is None
    master = opt.groups[0].master
    assert master.dtype == torch.float32 and torch.allclose(master, start - 3e-3, atol=1e-5)
    assert torch.equal(p.detach(), master.bfloat16())


def test_bf16_micro_batches_accumulate_in_fp32(one_thread):
    """A bf16 model, one step of 4 micro-batches: the accumulated gradient equals the exact (float64)
    sum of the 4 micro-batches' own bf16 gradients within fp32 summation error, where a bf16
    accumulator (the old bf16 flat buffer) is ~1e-3 off; and it equals the gradient of 1 micro-batch
    of all the tokens up to the bf16 rounding each backward makes anyway."""
    model = tiny_model(torch.bfloat16)
    opt = AdamW(parameter_groups(model, 0.0), lr=1e-3)
    micro = [sequences([37, 50, 23], seed=k) for k in range(4)]
    n_targets = sum(len(s) - 1 for seqs in micro for s in seqs)
    accumulated = gradient(model, opt, micro, n_targets)
    each = [gradient(model, opt, [seqs], n_targets) for seqs in micro]
    exact = torch.stack(each).double().sum(0)
    bf16_sum = each[0].bfloat16()
    for grad in each[1:]:
        bf16_sum = bf16_sum + grad.bfloat16()
    whole = gradient(model, opt, [[s for seqs in micro for s in seqs]], n_targets)
    assert all(p.grad is None for p in model.parameters())
    assert rel_err(accumulated, exact) < 1e-6 < 1e-4 < rel_err(bf16_sum, exact)
    assert rel_err(whole, exact) < 1e-2


def test_fp32_micro_batches_equal_one_micro_batch(one_thread):
    model = tiny_model()
    opt = AdamW(parameter_groups(model, 0.0), lr=1e-3)
    micro = [sequences([37, 50, 23], seed=k) for k in range(4)]
    n_targets = sum(len(s) - 1 for seqs in micro for s in seqs)
    accumulated = gradient(model, opt, micro, n_targets)
    whole = gradient(model, opt, [[s for seqs in micro for s in seqs]], n_targets)
    assert rel_err(accumulated, whole) < 1e-5


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
