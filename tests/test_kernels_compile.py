"""Every Triton kernel compiles for the H100 (sm_90) without register spills or shared-memory
overflow, checked on the CPU with the Triton wheel's compiler and CUDA tools.

The default run compiles the representative launches of kernels/launches.py (every kernel at
least once, both dtypes where the code differs); `python -m bench.kernel_report` checks all of
them. Compiling happens in a subprocess: conftest turns the interpreter on for this process.
"""
import json

import pytest

from bench.kernel_report import REPORT_NAME, run_isolated, tools_dir

pytestmark = pytest.mark.skipif(tools_dir() is None, reason="needs triton with its nvidia backend tools "
                                 "(triton/backends/nvidia/bin: cuobjdump, nvdisasm, ptxas)")


def compile_report(out, *args):
    """(exit code, report JSON) of the kernel report run with `args`."""
    rc = run_isolated(["--quiet", "--subset", "--out", str(out), *args])
    path = out / f"{REPORT_NAME}.json"
    assert path.is_file(), f"the kernel report wrote nothing (exit code {rc})"
    return rc, json.loads(path.read_text())


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    return compile_report(tmp_path_factory.mktemp("kernels"))


def test_subset_covers_every_kernel(subset):
    _, report = subset
    assert {r["kernel"] for r in report["rows"]} == set(report["registry_kernels"])
    for kernel in ("decode_kernel", "ce_rows_kernel", "adamw_kernel", "rms_norm_forward_kernel"):
        dtypes = {r["shape"].split()[0] for r in report["rows"] if r["kernel"] == kernel}
        assert dtypes == {"bf16", "fp32"}, f"{kernel}: both dtypes expected in the subset, got {dtypes}"


def test_kernels_compile_without_spills_or_shared_overflow(subset):
    rc, report = subset
    bad = [f"{r['kernel']} `{r['config']}` ({r['shape']}): {'; '.join(r['problems'])}"
           for r in report["rows"] if r["problems"]]
    assert not bad and rc == 0, "\n".join(bad)


def test_bf16_attention_uses_hopper_tensor_cores(subset):
    _, report = subset
    rows = [r for r in report["rows"] if r["kernel"] in ("attn_fwd_kernel", "attn_bwd_dkdv_kernel",
                                                         "attn_bwd_dq_kernel") and "DOT_DTYPE=bf16" in r["config"]]
    assert rows
    for r in rows:
        assert r["tensor_cores"].startswith("HGMMA"), f"{r['kernel']} `{r['config']}`: {r['tensor_cores']}"


def test_check_catches_shared_memory_overflow(tmp_path):
    """Decode attention with 512-row KV tiles in 4 pipeline stages cannot fit in 227 KB."""
    rc, report = compile_report(tmp_path, "--only", "^decode_kernel HEAD_DIM=128", "--set", "BLOCK_N=512",
                                "--set", "num_stages=4")
    assert rc == 1 and report["rows"]
    assert all(any("shared memory" in p for p in r["problems"]) for r in report["rows"])


def test_check_catches_register_spills(tmp_path):
    """A 8192-column RMSNorm row on one warp needs 256+ values per thread: it must spill."""
    rc, report = compile_report(tmp_path, "--only", "^rms_norm_forward_kernel HAS_RESIDUAL=True BLOCK=2048",
                                "--set", "BLOCK=8192", "--set", "num_warps=1")
    assert rc == 1 and report["rows"]
    assert all(any("spills registers" in p for p in r["problems"]) for r in report["rows"])
