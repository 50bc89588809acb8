"""AdamW written out (no torch.optim), global-norm clipping and the learning-rate schedule.

The update is torch.optim.AdamW's (decoupled weight decay, bias correction), done by
kernels.adamw_step: one fused Triton pass on the GPU, torch foreach ops on the CPU (in slices of
CPU_STEP_ELEMENTS, so its temporaries stay a few MB instead of 4 bytes per parameter).

Memory layout, one of two per parameter group (both stepped by the same loop over `parts()`):
  - flat, a model of its own (one process): the group's tensors are moved into one flat buffer and
    the model's parameters become views into it, as Megatron's contiguous buffers do. The group also
    owns one fp32 flat gradient buffer, `group.grad` (Megatron's main_grad; each parameter's slice
    is `p.main_grad`), so micro-batch accumulation sums in fp32 whatever the model's dtype:
      - fp32 model: `p.grad` is the parameter's view into `group.grad` (zero-copy: autograd
        accumulates straight into the buffer);
      - bf16 model: a post-accumulate-grad hook adds each bf16 `.grad` into the fp32 buffer as soon
        as autograd produces it and frees it (`p.grad` is None between backwards), so one
        parameter's bf16 gradient is alive at a time, not a second copy of the model.
    With bf16 weights the optimizer keeps fp32 master weights; the moments are fp32 always.
  - sharded, a model under FSDP2 (engine/distributed.py, several processes): each parameter is a
    DTensor whose local shard is this rank's part of the fp32 weights, i.e. the master weights;
    FSDP2 gathers them in bf16 for the forward and reduce-scatters the gradients in fp32 into
    `p.grad` (no hooks of ours). The step updates the local shards (`to_local()`), and the clipping
    norm sums the shards' squares over the ranks, so each rank holds 1/N of the 16 bytes a parameter.
Create the optimizer after moving (or sharding) the model, and do not move it after.

Gradient semantics (what step() sees), chosen so that torch.optim habits cannot silently train
on stale or zero gradients:
  - a `.grad` tensor that is not the buffer view (assigned by the caller, `p.grad = g`, or made
    by autograd after `model.zero_grad()` set it to None) is the parameter's whole gradient, as
    in torch.optim: it replaces the parameter's slice of the buffer, and `p.grad` points at the
    buffer again (fp32) or is freed (bf16);
  - fp32: a `.grad` of None when step() or clipping runs (model.zero_grad() and no
    backward reached the parameter since) raises GradientError: torch.optim would skip that
    parameter, a flat-buffer step cannot;
  - step() consumes the gradients: it zeroes the buffer after the update, so every step starts
    from zero whether or not the caller zeroes gradients. Accumulate micro-batches by running
    their backwards before one step(); read gradients before step(). zero_grad() discards
    gradients mid-accumulation (on a bf16 model `model.zero_grad()` cannot: the accumulated
    gradient lives only in the fp32 buffer).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from kernels.adamw import adamw_step, bytes_per_element
from kernels.dispatch import use_triton

# The CPU (torch reference) step runs in slices of this many elements: its sqrt(v) temporary is 1 MB
# instead of 4 bytes per parameter, and a slice's five streams stay in cache between the step's passes.
# Measured (one thread, 100M fp32 elements): 7.5 MiB of RSS above the buffers at the peak and 1.7 s,
# against 385 MiB (4.04 bytes/element: 1.9 GiB for 0.5B) and 2.5 s for one whole-buffer call; the
# extra does not grow with the size (2^21-element slices: 19.4 MiB at 100M, 19.5 MiB at 494M).
CPU_STEP_ELEMENTS = 1 << 18




def step_traffic(n: int, param_bytes: int, micro_batches: int = 1) -> dict[str, int]:
    """Bytes each pass of a training step's optimizer phase moves over n parameters of param_bytes
    (2: bf16 model, fp32 masters; 4: fp32), as train_step runs it: the hooks' adds of each
    micro-batch's gradient into the fp32 buffer (bf16 model), the global norm, and step(max_grad_norm)'s
    one fused pass (clipping factor, AdamW, zeroing; kernels.adamw.bytes_per_element)."""
    passes = {"norm (read the gradients)": 4 * n,
              "AdamW (clip scale, update, zero grads)": bytes_per_element(4, param_bytes if param_bytes != 4 else None,
                                                                          zero_grads=True) * n}
    if param_bytes != 4:
        passes = {"gradient adds into fp32 (hooks)": micro_batches * (param_bytes + 8) * n, **passes}
    return passes


class GradientError(RuntimeError):
    pass


class _Group:
    """One parameter group's tensors, in one of two layouts (the module docstring):
      - flat (a model of its own): the group's weights moved into one buffer, an fp32 gradient buffer
        beside it, fp32 masters when the weights are not fp32, the moments;
      - sharded (FSDP2, engine/distributed.py): each parameter is a DTensor whose local shard holds this
        rank's fp32 weights (the masters themselves); FSDP2's reduce-scatter leaves the fp32 gradient
        shard in p.grad; the moments are shaped like the local shards.
    `parts()` gives the same five lists for both, so step() and the norm have one code path."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, weight_decay: float):
        if len({(p.dtype, p.device) for p in params}) != 1:
            raise ValueError("all parameters of an optimizer group must share one dtype and device")
        if not all(p.requires_grad for p in params):
            raise ValueError("every parameter given to the optimizer must require a gradient: leave frozen "
                             "parameters out of its groups")
        self.params, self.lr, self.weight_decay = params, lr, weight_decay
        self.sharded = isinstance(params[0], DTensor)
        if self.sharded:
            if params[0].dtype != torch.float32:
                raise ValueError("shard the model in fp32 (FSDP2's shards are the master weights; its "
                                 "MixedPrecisionPolicy computes in bf16)")
            self.exp_avg = [torch.zeros_like(p.to_local()) for p in params]
            self.exp_avg_sq = [torch.zeros_like(p.to_local()) for p in params]
            return
        self.flat = torch.cat([p.detach().reshape(-1) for p in params])
        self.master = self.flat if self.flat.dtype == torch.float32 else self.flat.float()
        self.grad = torch.zeros_like(self.master)
        self.views_grad = self.master is self.flat      # fp32: p.grad is the buffer view
        self.slices: list[tuple[torch.Tensor, torch.Tensor]] = []    # (weight view, gradient view) per param
        offset = 0
        for p in params:
            n = p.numel()
            p.data = self.flat[offset:offset + n].view_as(p)
            p.main_grad = self.grad[offset:offset + n].view_as(p)
            p.grad = p.main_grad if self.views_grad else None
            p.register_post_accumulate_grad_hook(self.take_grad)
            self.slices.append((p.data, p.main_grad))
            offset += n
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)

    def parts(self) -> tuple[list, list, list, list, list | None]:
        """(masters, gradients, exp_avgs, exp_avg_sqs, the model's lower-precision copies or None), 1-D."""
        if not self.sharded:
            return ([self.master], [self.grad], [self.exp_avg], [self.exp_avg_sq],
                    None if self.master is self.flat else [self.flat])
        flat = lambda tensors: [t.reshape(-1) for t in tensors]
        return (flat(p.to_local() for p in self.params), flat(p.grad.to_local() for p in self.params),
                flat(self.exp_avg), flat(self.exp_avg_sq), None)

    def named_state(self, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """{"weights" | "exp_avg" | "exp_avg_sq": {name: fp32 tensor shaped like the parameter}}: views
        of the live tensors (DTensors when sharded), to save and to load into in place."""
        if self.sharded:
            wrap = lambda p, t: DTensor.from_local(t, p.device_mesh, p.placements, run_check=False,
                                                   shape=p.shape, stride=p.stride())
            return {"weights": dict(zip(names, self.params)),
                    "exp_avg": {n: wrap(p, t) for n, p, t in zip(names, self.params, self.exp_avg)},
                    "exp_avg_sq": {n: wrap(p, t) for n, p, t in zip(names, self.params, self.exp_avg_sq)}}
        state, offset = {"weights": {}, "exp_avg": {}, "exp_avg_sq": {}}, 0
        for name, p in zip(names, self.params):
            for key, buffer in (("weights", self.master), ("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                state[key][name] = buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        return state

    def take_grad(self, p: torch.nn.Parameter) -> None:
        """After autograd accumulated into p.grad: move a gradient that is not the buffer view into
        the buffer (bf16: add this micro-batch's; fp32: a fresh tensor after zero_grad replaces)."""
        grad = p.grad
        if grad is None or grad.data_ptr() == p.main_grad.data_ptr():
            return
        if self.views_grad:
            p.main_grad.copy_(grad)
            p.grad = p.main_grad
        else:
            p.main_grad.add_(grad)
            p.grad = None

    def collect(self, index: int) -> None:
        """Before the gradients are read: adopt assigned gradients, refuse lost ones (module docstring)."""
        if self.sharded:
            for i, p in enumerate(self.params):
                if p.grad is None:
                    raise GradientError(f"parameter {i} of optimizer group {index} (shape {list(p.shape)}) has no "
                                        "gradient shard: every rank must run the step's forward and backward")
            return
        for i, (p, (weight, main_grad)) in enumerate(zip(self.params, self.slices)):
            if p.data_ptr() != weight.data_ptr():
                raise GradientError(f"parameter {i} of optimizer group {index} (shape {list(p.shape)}) no longer "
                                    "lives in the optimizer's buffer (moved or replaced after the optimizer was "
                                    "created): create the optimizer after the model's last .to()/load")
            grad = p.grad
            if grad is None:
                if self.views_grad:
                    raise GradientError(
                        f"parameter {i} of optimizer group {index} (shape {list(p.shape)}) has no gradient: its "
                        ".grad was set to None (model.zero_grad()?) and no backward reached it since; "
                        "torch.optim.AdamW would skip it, this flat-buffer AdamW cannot: give it a gradient "
                        "or leave it out of the optimizer (opt.zero_grad() zeroes without losing the buffer)")
            elif grad.data_ptr() != main_grad.data_ptr():
                main_grad.copy_(grad)
                p.grad = main_grad if self.views_grad else None

    def zero_grad(self) -> None:
        if self.sharded:
            for p in self.params:
                if p.grad is not None:
                    p.grad.to_local().zero_()
            return
        self.grad.zero_()
        for p in self.params:
            p.grad = p.main_grad if self.views_grad else None

    def copy_masters_to_model(self) -> None:
        """After the masters were loaded: the model's lower-precision weights from them (flat layout)."""
        if not self.sharded and self.master is not self.flat:
            self.flat.copy_(self.master)


class AdamW:
    """AdamW(params_or_groups, lr, betas, eps, weight_decay), the update of torch.optim.AdamW.

    params_or_groups: parameters, or dicts {"params": [...], "weight_decay": ..., "lr": ...}.
    Gradients: see the module docstring (step() consumes them)."""

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
    def collect_grads(self) -> None:
        """Bring assigned or re-created .grad tensors into the fp32 buffers (step and clipping do it)."""
        for i, g in enumerate(self.groups):
            g.collect(i)

    @torch.no_grad()
    def step(self, max_grad_norm: float | None = None):
        """One AdamW update from the accumulated gradients, which it then zeroes. With max_grad_norm:
        clipped first, as clip_grad_norm_ then step() would, but in two passes over the gradients
        (the norm, then the update that applies the clipping factor and zeroes them); returns the
        norm before clipping (a device tensor, no host sync; across all shards when sharded)."""
        self.collect_grads()
        norm = scale = None
        if max_grad_norm is not None:
            norm, scale = self._norm_and_scale(max_grad_norm)
        self.step_count += 1
        for g in self.groups:
            masters, grads, exp_avgs, exp_avg_sqs, copies = g.parts()
            for i, master in enumerate(masters):
                n = master.numel()
                size = max(1, n) if use_triton(master) else CPU_STEP_ELEMENTS   # Triton: no temporaries
                for start in range(0, n, size):
                    part = slice(start, start + size)
                    adamw_step([master[part]], [grads[i][part]], [exp_avgs[i][part]], [exp_avg_sqs[i][part]],
                               None if copies is None else [copies[i][part]], step=self.step_count, lr=g.lr,
                               beta1=self.betas[0], beta2=self.betas[1], eps=self.eps, weight_decay=g.weight_decay,
                               grad_scale=scale, zero_grads=True)
        return norm

    @torch.no_grad()
    def zero_grad(self) -> None:
        """Discard the gradients accumulated so far (step() already leaves them zero)."""
        for g in self.groups:
            g.zero_grad()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale all gradients by min(1, max_norm / (norm + 1e-6)) as torch.nn.utils.clip_grad_norm_
        does; returns the norm before clipping, without a host sync."""
        self.collect_grads()
        norm, scale = self._norm_and_scale(max_norm)
        for g in self.groups:
            torch._foreach_mul_(g.parts()[1], scale.reshape(()))
        return norm

    def _norm_and_scale(self, max_norm: float):
        """The global gradient norm (over every shard of every rank when sharded) and the clipping factor."""
        grads = [t for g in self.groups for t in g.parts()[1]]
        squares = torch.stack(torch._foreach_norm(grads)).square().sum()     # one launch per group of tensors
        if any(g.sharded for g in self.groups) and dist.is_initialized():
            dist.all_reduce(squares)
        norm = squares.sqrt()
        return norm, (max_norm / (norm + 1e-6)).clamp(max=1.0).reshape(1)

    def state_dict(self, names: list[list[str]] | None = None) -> dict:
        """The optimizer's whole state. Its tensors ("weights": the fp32 masters, "exp_avg", "exp_avg_sq")
        are keyed by parameter name (names: per group, as model_names gives them; default: positions)
        and are views of the live tensors (DTensors when sharded), so that torch.distributed.checkpoint
        saves them, and loads into them in place, on any number of ranks."""
        names = names or [[f"{i}.{j}" for j in range(len(g.params))] for i, g in enumerate(self.groups)]
        state = {"step": self.step_count, "betas": list(self.betas), "eps": self.eps,
                 "groups": [{"lr": g.lr, "weight_decay": g.weight_decay} for g in self.groups],
                 "weights": {}, "exp_avg": {}, "exp_avg_sq": {}}
        for g, group_names in zip(self.groups, names):
            for key, tensors in g.named_state(group_names).items():
                state[key].update(tensors)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict, names: list[list[str]] | None = None) -> None:
        """The state state_dict(names) gave (its tensors copied in, unless they are this optimizer's own
        views, as after a checkpoint load in place), then the model's weights from the masters."""
        mine = self.state_dict(names)
        for key in ("weights", "exp_avg", "exp_avg_sq"):
            if state[key].keys() != mine[key].keys() or any(
                    state[key][name].shape != tensor.shape for name, tensor in mine[key].items()):
                raise ValueError("optimizer state does not match the model's parameters: was it saved for "
                                 "another model?")
            for name, tensor in mine[key].items():
                if state[key][name] is not tensor:
                    tensor.copy_(state[key][name])
        self.step_count, self.betas, self.eps = state["step"], tuple(state["betas"]), state["eps"]
        for g, saved in zip(self.groups, state["groups"]):
            g.lr, g.weight_decay = saved["lr"], saved["weight_decay"]
            g.copy_masters_to_model()

    def resident_bytes(self) -> int:
        """Bytes of this process's weights, gradients, masters and moments (local shards when sharded),
        measured from the tensors."""
        total = 0
        for g in self.groups:
            masters, grads, exp_avgs, exp_avg_sqs, copies = g.parts()
            tensors = masters + grads + exp_avgs + exp_avg_sqs + (copies or [])
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total


def model_names(model: torch.nn.Module, opt: AdamW) -> list[list[str]]:
    """Each optimizer group's parameter names in the model (what its state is keyed by)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [[names[id(p)] for p in g.params] for g in opt.groups]


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
