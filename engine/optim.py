"""AdamW written out (no torch.optim), global-norm clipping and the learning-rate schedule.

The update is torch.optim.AdamW's (decoupled weight decay, bias correction), done by
kernels.adamw_step: one fused Triton pass on the GPU, torch foreach ops on the CPU.

Memory layout: each parameter group's tensors are moved into one flat buffer, and the model's
parameters become views into it (so do their .grad tensors, into a flat gradient buffer), as
Megatron's contiguous buffers do. The step, the zeroing and the clipping are then a handful of
large operations instead of one per tensor. When the model runs in bf16 the optimizer keeps
fp32 master weights and the moments in fp32; in fp32 the parameters are their own masters.
Create the optimizer after moving the model to its device and dtype, and do not move it after.
"""
from __future__ import annotations

import math

import torch

from kernels.adamw import adamw_step


class _Group:
    def __init__(self, params: list[torch.nn.Parameter], lr: float, weight_decay: float):
        if len({(p.dtype, p.device) for p in params}) != 1:
            raise ValueError("all parameters of an optimizer group must share one dtype and device")
        self.params, self.lr, self.weight_decay = params, lr, weight_decay
        self.flat = torch.cat([p.detach().reshape(-1) for p in params])
        self.grad = torch.zeros_like(self.flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.data = self.flat[offset:offset + n].view_as(p)
            p.grad = self.grad[offset:offset + n].view_as(p)
            offset += n
        self.master = self.flat if self.flat.dtype == torch.float32 else self.flat.float()
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)


class AdamW:
    """AdamW(params_or_groups, lr, betas, eps, weight_decay), behaving exactly like torch.optim.AdamW.

    params_or_groups: parameters, or dicts {"params": [...], "weight_decay": ..., "lr": ...}."""

    def __init__(self, params_or_groups, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        groups = list(params_or_groups)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.groups = [_Group([p for p in g["params"]], g.get("lr", lr), g.get("weight_decay", weight_decay))
                       for g in groups if len(g["params"])]
        self.betas, self.eps, self.step_count = betas, eps, 0

    def set_lr(self, lr: float) -> None:
        for group in self.groups:
            group.lr = lr

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        for g in self.groups:
            adamw_step([g.master], [g.grad], [g.exp_avg], [g.exp_avg_sq],
                       None if g.master is g.flat else [g.flat], step=self.step_count, lr=g.lr,
                       beta1=self.betas[0], beta2=self.betas[1], eps=self.eps, weight_decay=g.weight_decay)

    def zero_grad(self) -> None:
        for g in self.groups:
            g.grad.zero_()

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """The global L2 norm of all gradients (a device tensor: no host sync)."""
        return torch.stack([torch.linalg.vector_norm(g.grad, dtype=torch.float32) for g in self.groups]).norm()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale all gradients by min(1, max_norm / (norm + 1e-6)) as torch.nn.utils.clip_grad_norm_
        does; returns the norm before clipping, without a host sync."""
        norm = self.grad_norm()
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in self.groups:
            g.grad.mul_(scale.to(g.grad.dtype))
        return norm

    def state_dict(self) -> dict:
        return {"step": self.step_count, "betas": self.betas, "eps": self.eps, "groups": [
            {"lr": g.lr, "weight_decay": g.weight_decay, "numel": g.master.numel(), "exp_avg": g.exp_avg,
             "exp_avg_sq": g.exp_avg_sq, "master": None if g.master is g.flat else g.master}
            for g in self.groups]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if [s["numel"] for s in state["groups"]] != [g.master.numel() for g in self.groups]:
            raise ValueError("optimizer state does not match the model's parameter groups: was it saved for "
                             "another model?")
        self.step_count, self.betas, self.eps = state["step"], tuple(state["betas"]), state["eps"]
        for g, s in zip(self.groups, state["groups"]):
            g.lr, g.weight_decay = s["lr"], s["weight_decay"]
            g.exp_avg.copy_(s["exp_avg"])
            g.exp_avg_sq.copy_(s["exp_avg_sq"])
            if s["master"] is not None and g.master is not g.flat:
                g.master.copy_(s["master"])
                g.flat.copy_(g.master)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The no-decay policy: biases, norm weights (every 1-D tensor) and the embedding (often the
    tied output matrix too) are not decayed; matrices are. Decaying the embedding of a model that
    must reproduce rare characters exactly pulls their rows toward zero for no benefit."""
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or id(p) in embeddings else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int, schedule: str = "cosine",
          min_ratio: float = 0.1) -> float:
    """Linear warmup to peak_lr, then constant or cosine decay to min_ratio * peak_lr at total_steps.

    Default cosine: the late low-LR epochs settle the last uncertain characters, which is what
    exact recitation measures; warmup keeps the first steps on a pretrained model from wrecking it."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak_lr
    if schedule != "cosine":
        raise ValueError(f"unknown LR schedule {schedule!r}: choose cosine or constant")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
