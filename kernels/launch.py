"""What the ops share around a Triton launch: the device it runs on, the limits its
configuration must fit, row layouts and grids, and the device helpers of more than one kernel.

    @on_device                      # the launch runs on its inputs' GPU, not the current one
    def triton_op(x, ...): ...
    hw = hardware_for(x)            # the limits a launch configuration must fit
    with target(TARGETS[89]): ...   # choose configurations for another GPU (compile checks, tests)

Triton launches on torch.cuda.current_device(), whatever device its tensors live on: with the
model on cuda:1, every kernel would run on GPU 0's stream against GPU 1's memory. `on_device`
makes the first tensor argument's device current for the call (a no-op for CPU and meta
tensors): every host function that launches a kernel (`kernel[grid](...)`) is wrapped by it.
"""
from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch

from kernels.dispatch import INTERPRETING, tl, triton
from kernels.hardware import TARGETS, Hardware, hardware_of

LOG2E = 1.4426950408889634      # kernels keep softmax scores in the exp2 domain

_target: Hardware | None = None     # set by `target`: configurations for this GPU, whatever runs


def device_of(x: torch.Tensor):
    """A context in which x's CUDA device is the current one (nothing to do off CUDA)."""
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _first_tensor(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0]
    return None


def on_device(fn):
    """Runs fn with its first tensor argument's (or first tensor list's) device current."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        x = _first_tensor((*args, *kwargs.values()))
        if x is None:
            return fn(*args, **kwargs)
        with device_of(x):
            return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def target(hw: Hardware):
    """Choose launch configurations for `hw` inside the block, whatever device the tensors are on."""
    global _target
    previous, _target = _target, hw
    try:
        yield hw
    finally:
        _target = previous


def hardware_for(x: torch.Tensor | torch.device) -> Hardware:
    """The GPU whose limits launch configurations for tensor (or device) x must fit: the `target`
    override, else x's own CUDA device, else the sm_90 target (interpreter and meta tensors)."""
    device = x.device if isinstance(x, torch.Tensor) else torch.device(x)
    if _target is not None:
        return _target
    if device.type == "cuda":
        return hardware_of(device)
    return TARGETS[90]


# ---------------------------------------------------------------------------------------------
# Row layouts and grids
# ---------------------------------------------------------------------------------------------

MAX_ROW_COLS = 65536  # a row kernel holds one whole row in one program's registers


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., H] as a [rows, H] tensor with unit column stride (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def row_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a row kernel whose program holds one whole row of n_cols (norms)."""
    if n_cols > MAX_ROW_COLS:
        raise ValueError(f"row kernels hold a whole row in one program: {n_cols} columns > {MAX_ROW_COLS}")
    block = triton.next_power_of_2(n_cols)
    num_warps = 16 if block >= 16384 else 8 if block >= 2048 else 4
    return block, num_warps


PROGRAMS_PER_SM = 4   # partial-sum backward programs resident per SM: loads of several in flight at once


def backward_rows(block: int) -> int:
    """Rows a partial-sum backward program loads per iteration (a [ROWS, BLOCK] tile, ~4K elements): several
    rows' loads in flight at once instead of one row's load, reduction and store after another."""
    return max(1, min(8, 4096 // block))


def partial_programs(n_rows: int, x: torch.Tensor, rows: int = 1) -> tuple[int, int]:
    """(programs, rows per program, a multiple of `rows`) of a backward with per-program partial sums:
    PROGRAMS_PER_SM per SM of x's GPU, fewer when there are not enough row tiles."""
    tiles = triton.cdiv(n_rows, rows)
    # the interpreter pays per program: few, each looping over rows
    programs = max(1, min(tiles, 8 if INTERPRETING else PROGRAMS_PER_SM * hardware_for(x).sm_count))
    per_program = triton.cdiv(tiles, programs) * rows
    return triton.cdiv(n_rows, per_program), per_program


def elementwise_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for an elementwise kernel over rows of n_cols: 1024-wide column blocks
    waste at most a few percent of lanes on the intermediate sizes (4864, 8960, 2816, ...)."""
    block = min(1024, triton.next_power_of_2(n_cols))
    return block, max(1, min(4, block // 256))


def elementwise_grid(n_rows: int, n_cols: int) -> tuple[int, int]:
    """The 2D grid of an elementwise row kernel: (rows, column blocks)."""
    return n_rows, triton.cdiv(n_cols, elementwise_config(n_cols)[0])


# ---------------------------------------------------------------------------------------------
# Tiled kernels (attention, decode attention)
# ---------------------------------------------------------------------------------------------

class LaunchConfig(NamedTuple):
    block_m: int      # rows of the query-side tile
    block_n: int      # rows of the key-side tile
    num_warps: int
    num_stages: int


def tile_shared_bytes(cfg: LaunchConfig, hw: Hardware, streamed: int, resident: int) -> int:
    """An upper bound of the shared memory one block of a tiled kernel uses: the bytes its loop
    streams per iteration, buffered num_stages deep on Hopper (wgmma pipelines) and
    num_stages - 1 deep before it (cp.async), the tiles held for the whole program, one fp32
    [block_m, block_n] score tile for layout changes and 1 KB of reduction scratch. (Checked
    against the compiler's figure for sm_80, sm_89 and sm_90: see tests/test_kernels_compile.py.)"""
    buffers = cfg.num_stages if hw.arch >= 90 else max(1, cfg.num_stages - 1)
    return buffers * streamed + resident + 4 * cfg.block_m * cfg.block_n + 1024


def fit_shared_memory(cfg: LaunchConfig, hw: Hardware, tile_bytes, halve=("block_m", "block_n")) -> LaunchConfig:
    """cfg, or the first smaller variant whose shared memory fits hw: fewer pipeline stages, then
    the largest of the `halve` tiles halved (all of them when equal), which keeps power-of-two
    tiles dividing one another as the attention kernels' diagonal logic needs.
    tile_bytes(cfg) -> (streamed, resident), as `tile_shared_bytes` takes them."""
    while tile_shared_bytes(cfg, hw, *tile_bytes(cfg)) > hw.shared_memory_per_block:
        largest = max(getattr(cfg, name) for name in halve)
        if cfg.num_stages > 1:
            cfg = cfg._replace(num_stages=cfg.num_stages - 1)
        elif largest > 16:
            cfg = cfg._replace(**{name: largest // 2 for name in halve if getattr(cfg, name) == largest})
        else:
            raise ValueError(f"no launch configuration fits the {hw.shared_memory_per_block} bytes of shared memory "
                             f"per block of {hw.name}")
    return cfg


def dot_types(dtype: torch.dtype):
    """(tl.dot operand dtype, input_precision) for inputs of `dtype`: fp32 in the interpreter
    (bf16 math is garbage there), the input dtype on the GPU; fp32 inputs get IEEE products
    instead of tf32."""
    if INTERPRETING or dtype == torch.float32:
        return tl.float32, "ieee"
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype], "tf32"


@triton.jit
def load_tile(base, rows, stride, cols, n_rows, MASKED: tl.constexpr):
    """The tile base[rows * stride + cols] [len(rows), len(cols)]; with MASKED, rows at or past
    n_rows read 0 (a K/V or Q tile that runs past its sequence)."""
    ptrs = base + rows[:, None] * stride + cols[None, :]
    if MASKED:
        tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def online_softmax_step(acc, l_i, m_i, s, v, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile of a streaming softmax(s) @ v in the exp2 domain: scores s [M, N] (masked
    ones -inf), values v [N, D]; running row max m_i, row sum l_i and unnormalized acc [M, D]."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
    return acc, l_i, m_new
