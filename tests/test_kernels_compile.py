"""Every Triton kernel compiles for the H100 (sm_90), the A100 (sm_80) and the L40S (sm_89)
within each card's limits (no register spills, shared memory per block), checked on the CPU
with Triton's compiler and the CUDA tools it uses.

The default run compiles the representative launches of bench/launches.py (every kernel at
least once, both dtypes where the code differs) for sm_90, and on sm_80 / sm_89 the kernels
whose configurations depend on the card (bf16 attention and decode, the shared-memory users);
`python cli.py kernels` checks all of them on all three. Compiling happens in a subprocess:
conftest turns the interpreter on for this process.
"""
import json
from types import SimpleNamespace

import pytest

from bench.kernel_report import ToolError, _ptxas_spills, problems, report_name, run_isolated, tools_missing
from kernels.hardware import TARGETS

needs_tools = pytest.mark.skipif(tools_missing() is not None, reason=str(tools_missing()))

# Kernels whose launch configs follow the card's shared memory, in bf16 (the fp32 IEEE-dot tiles
# are smaller and the slowest compiles: left to `cli.py kernels`)
CARD_DEPENDENT = r"^(attn_(fwd|bwd_dkdv|bwd_dq)_kernel .*DOT_DTYPE=bf16|decode_kernel)"


def compile_report(out, archs, *args):
    """(exit code, {arch: report JSON}) of the kernel report for `archs` run with `args`."""
    rc = run_isolated(["--quiet", "--subset", *(f"--arch={arch}" for arch in archs), "--out", str(out), *args])
    reports = {}
    for arch in archs:
        path = out / f"{report_name(arch)}.json"
        assert path.is_file(), f"the kernel report wrote nothing for sm_{arch} (exit code {rc})"
        reports[arch] = json.loads(path.read_text())
    return rc, reports


@pytest.fixture(scope="module")
def sm90(tmp_path_factory):
    rc, reports = compile_report(tmp_path_factory.mktemp("sm90"), [90])
    return rc, reports[90]


@pytest.fixture(scope="module")
def older_cards(tmp_path_factory):
    """sm_80 and sm_89 in one run: the kernels whose configs follow the card."""
    return compile_report(tmp_path_factory.mktemp("sm80-89"), [80, 89], "--only", CARD_DEPENDENT)[1]


def failures(report) -> list[str]:
    return [f"{r['kernel']} `{r['config']}` ({r['shape']}): {'; '.join(r['problems'])}"
            for r in report["rows"] if r["problems"]]


@needs_tools
def test_subset_covers_every_kernel(sm90):
    _, report = sm90
    assert {r["kernel"] for r in report["rows"]} == set(report["registry_kernels"])
    for kernel in ("decode_kernel", "ce_rows_kernel", "adamw_kernel", "rms_norm_forward_kernel"):
        dtypes = {r["shape"].split()[0] for r in report["rows"] if r["kernel"] == kernel}
        assert dtypes == {"bf16", "fp32"}, f"{kernel}: both dtypes expected in the subset, got {dtypes}"


@needs_tools
def test_kernels_compile_without_spills_or_shared_overflow(sm90):
    rc, report = sm90
    bad = failures(report)
    assert not bad and rc == 0, "\n".join(bad)


@needs_tools
@pytest.mark.parametrize("arch", [80, 89])
def test_attention_and_decode_fit_older_cards(older_cards, arch):
    """On the A100 (164 KB per block) and the L40S (~99 KB) the ops pick configs that fit."""
    report = older_cards[arch]
    kernels = {r["kernel"] for r in report["rows"]}
    assert {"attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel", "decode_kernel"} <= kernels
    bad = failures(report)
    assert not bad, f"{report['target']}:\n" + "\n".join(bad)


@needs_tools
def test_bf16_attention_uses_tensor_cores(sm90, older_cards):
    """wgmma (HGMMA) on Hopper, mma.sync (HMMA) on Ampere and Ada; never CUDA cores."""
    for report, expected in ((sm90[1], "HGMMA"), (older_cards[80], "HMMA"), (older_cards[89], "HMMA")):
        rows = [r for r in report["rows"] if r["kernel"] in ("attn_fwd_kernel", "attn_bwd_dkdv_kernel",
                                                             "attn_bwd_dq_kernel") and "DOT_DTYPE=bf16" in r["config"]]
        assert rows, report["target"]
        for r in rows:
            assert r["tensor_cores"].startswith(expected), \
                f"{report['target']} {r['kernel']} `{r['config']}`: {r['tensor_cores']}"


def test_each_card_is_checked_against_its_own_limits():
    """fp32 decode at d128 in 3 stages (143,424 B) fits an A100 or H100 block, not an L40S one."""
    compiled = {"registers": 128, "stack": 0, "local": 0, "spill_stores": 0, "spill_loads": 0, "shared": 143_424}
    assert problems(compiled, TARGETS[80]) == problems(compiled, TARGETS[90]) == []
    assert [p for p in problems(compiled, TARGETS[89]) if "101376 B" in p and "L40S" in p]
    assert any("255 limit" in p for p in problems({**compiled, "shared": 0, "registers": 256}, TARGETS[90]))


@needs_tools
def test_adamw_math_is_ieee_rounded(sm90):
    """"Exactly torch.optim.AdamW" needs correctly rounded sqrt and division on the GPU too:
    tl.sqrt and `/` compile to sqrt.approx.f32 and div.full.f32."""
    _, report = sm90
    rows = [r for r in report["rows"] if r["kernel"] == "adamw_kernel"]
    assert rows
    for r in rows:
        assert r["inexact_math"] == [], f"adamw_kernel ({r['shape']}): {r['inexact_math']} in its sm_90 PTX"


@needs_tools
@pytest.mark.parametrize("launches, changes, problem", [
    # decode attention with 512-row KV tiles in 4 pipeline stages cannot fit in 227 KB
    ("^decode_kernel HEAD_DIM=128", ["BLOCK_N=512", "num_stages=4"], "shared memory"),
    # a 8192-column RMSNorm row on one warp needs 256+ values per thread: it must spill
    ("^rms_norm_forward_kernel HAS_RESIDUAL=True BLOCK=2048", ["BLOCK=8192", "num_warps=1"], "spills registers"),
], ids=["shared_memory_overflow", "register_spills"])
def test_check_catches(tmp_path, launches, changes, problem):
    rc, reports = compile_report(tmp_path, [90], "--only", launches, *(arg for c in changes for arg in ("--set", c)))
    report = reports[90]
    assert rc == 1 and report["rows"]
    assert all(any(problem in p for p in r["problems"]) for r in report["rows"])


def test_tool_failure_is_a_finding(tmp_path):
    """A CUDA tool that fails (triton 3.9's PTX given to an older ptxas) becomes the launch's
    error, reported as a problem, not a traceback."""
    ptxas = tmp_path / "ptxas"
    ptxas.write_text("#!/bin/sh\necho 'ptxas fatal   : Unsupported .version 9.4; current version is 8.8' >&2\n"
                     "exit 255\n")
    ptxas.chmod(0o755)
    with pytest.raises(ToolError, match=r"ptxas failed: .*Unsupported \.version 9\.4") as failure:
        _ptxas_spills({"ptxas": SimpleNamespace(path=str(ptxas))}, ".version 9.4\n.target sm_90a\n", tmp_path)
    with pytest.raises(ToolError, match="ptxas failed"):
        _ptxas_spills({"ptxas": SimpleNamespace(path=str(tmp_path / "missing"))}, ".target sm_90a\n", tmp_path)
    assert problems({"error": str(failure.value)}, TARGETS[90]) == [str(failure.value)]
