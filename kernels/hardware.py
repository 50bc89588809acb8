"""The GPUs we choose launch configurations for, project costs on and report against: one table.

    hw = hardware_of(x.device)       # a CUDA device: its own limits, the table's peak figures
    TARGETS[89]                      # the L40S-class limits, to compile for sm_89 without one

Limits (shared memory a block may opt into, SMs) decide which launch configurations fit;
peak figures (datasheet dense bf16 FLOP/s, HBM bytes/s) give MFU and projections; measured
ceilings (bf16 matmul and device copy, on these machines' H100/H200) give rooflines.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Hardware:
    name: str
    arch: int                       # compute capability as major * 10 + minor: 80, 89, 90
    shared_memory_per_block: int    # bytes a block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin)
    sm_count: int
    peak_bf16_flops: float          # dense tensor-core datasheet figure
    peak_fp32_flops: float          # CUDA cores, datasheet
    hbm_bytes_per_second: float     # datasheet
    matmul_flops: float | None = None       # measured bf16 matmul ceiling, where we have one
    copy_bytes_per_second: float | None = None   # measured device-to-device copy

    @property
    def roofline_matmul_flops(self) -> float:
        return self.matmul_flops or self.peak_bf16_flops

    @property
    def roofline_bytes_per_second(self) -> float:
        return self.copy_bytes_per_second or self.hbm_bytes_per_second


HARDWARE = {
    "H100": Hardware("H100 SXM", 90, 232_448, 132, 989e12, 67e12, 3.35e12, matmul_flops=780e12,
                     copy_bytes_per_second=3.0e12),
    "H200": Hardware("H200", 90, 232_448, 132, 989e12, 67e12, 4.8e12, matmul_flops=790e12,
                     copy_bytes_per_second=4.3e12),
    "A100": Hardware("A100 SXM 80GB", 80, 166_912, 108, 312e12, 19.5e12, 2.039e12),
    "L40S": Hardware("L40S", 89, 101_376, 142, 362e12, 91.6e12, 0.864e12),
}
# One card per compile target: `cli.py kernels` checks every launch against these limits.
TARGETS = {80: HARDWARE["A100"], 89: HARDWARE["L40S"], 90: HARDWARE["H100"]}
# What costs are projected on when no benchmark of the device exists.
PROJECTION = HARDWARE["H100"]


def lookup(name: str) -> Hardware | None:
    """The table's entry whose key appears in a device name ("NVIDIA H200" -> H200), else None."""
    upper = name.upper()
    return next((hw for key, hw in HARDWARE.items() if key in upper), None)


@functools.lru_cache(maxsize=None)
def hardware_of(device) -> Hardware:
    """A CUDA device as the table knows it, with the limits the device itself reports."""
    props = torch.cuda.get_device_properties(torch.device(device))
    arch = 10 * props.major + props.minor
    known = lookup(props.name) or TARGETS.get(arch) or PROJECTION
    smem = getattr(props, "shared_memory_per_block_optin", None) or known.shared_memory_per_block
    return replace(known, name=props.name, arch=arch, shared_memory_per_block=smem,
                   sm_count=props.multi_processor_count)
