"""What the compiler says about every Triton launch on each GPU we target, without a GPU.

    python -m bench.kernel_report --out bench/results            # the whole registry, sm_80/89/90
    python -m bench.kernel_report --arch 89 --subset --only attn_fwd   # the test subset, one kernel
    python -m bench.kernel_report --arch 90 --only attn_fwd --set BLOCK_M=256 --set num_stages=4  # what-if

For each target in kernels.hardware.TARGETS (sm_80 A100, sm_89 L40S, sm_90 H100), records the
launches of bench/launches.py under kernels.launch.target(that card), so the configurations are
the ones the ops would choose there, compiles each with triton.compile for GPUTarget("cuda",
arch, 32) (the interpreter off), then reads the binary with the CUDA tools Triton itself uses
(the assembler Triton runs for that target, cuobjdump, nvdisasm, as triton locates them):
registers and spills (cuobjdump --dump-resource-usage, then ptxas -v for the spill bytes),
shared memory (Triton's metadata.shared, against the card's per-block limit), and for kernels
that call tl.dot the tensor-core instructions in the SASS: HGMMA (wgmma) is the Hopper path,
HMMA (mma.sync) the Ampere/Ada one, none (FFMA) no tensor cores. Each row also gets its roofline
time on the target card (launches.roofline_seconds), so a GPU timing reads as "x% of roofline".
A compile error or a failing tool is a row of the report, not a crash.

Writes kernels-static-sm{arch}.json and .md under --out; exits 1 when a launch fails a check
(compile or tool error, spills, registers or shared memory over the card's limits).

Compiled binaries are cached within a run (one compile per distinct binary and target) and on
disk by Triton itself (~/.triton/cache, keyed by triton version, kernel source and specialization).
Under TRITON_INTERPRET=1 (the tests) main() reruns itself in a subprocess without it.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common
from kernels.hardware import TARGETS

MAX_REGISTERS = 255            # per thread, on every target
# A few spilled bytes far below the register cap are not register pressure (see NOTES: rope)
SMALL_SPILL_BYTES, LOW_REGISTERS = 16, 128


def report_name(arch: int) -> str:
    return f"kernels-static-sm{arch}"


class ToolError(Exception):
    """A CUDA tool could not run or failed: reported as the launch's error."""


def nvidia_tools(arch: int) -> dict:
    """The tools Triton itself uses for `arch` (triton.knobs.NvidiaTool: .path, .version): the
    assembler its nvidia backend runs (triton 3.9 assembles sm_90 with ptxas-blackwell, as the
    PTX .version it writes needs), cuobjdump and nvdisasm (TRITON_PTXAS_PATH etc. honoured)."""
    try:
        from triton import knobs
        from triton.backends.nvidia.compiler import get_ptxas
        return {"ptxas": get_ptxas(arch), "cuobjdump": knobs.nvidia.cuobjdump, "nvdisasm": knobs.nvidia.nvdisasm}
    except Exception as e:   # no triton, no nvidia backend, or a tool triton cannot find
        raise ToolError(f"{type(e).__name__}: {e}") from None


def tool_versions(arch: int) -> dict[str, str]:
    return {name: f"{Path(tool.path).name} {tool.version}" for name, tool in nvidia_tools(arch).items()}


def tools_missing() -> str | None:
    """Why the report cannot run here, or None."""
    try:
        for arch in TARGETS:
            nvidia_tools(arch)
    except ToolError as e:
        return f"needs triton with its nvidia backend tools (ptxas, cuobjdump, nvdisasm): {e}"
    return None


def _run_tool(tools: dict, tool: str, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([tools[tool].path, *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = (getattr(e, "stderr", None) or str(e)).strip().splitlines()
        raise ToolError(f"{tool} failed: {detail[-1] if detail else type(e).__name__}") from None


def _resource_usage(tools: dict, cubin: Path) -> dict:
    out = _run_tool(tools, "cuobjdump", "--dump-resource-usage", str(cubin)).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    if not {"REG", "STACK", "LOCAL"} <= found.keys():
        raise ToolError(f"cuobjdump printed no REG/STACK/LOCAL figures: {out.strip()[:200]!r}")
    return {"registers": int(found["REG"]), "stack": int(found["STACK"]), "local": int(found["LOCAL"])}


def _ptxas_spills(tools: dict, ptx: str, tmp: Path) -> dict:
    """Spill stores and loads (bytes) as ptxas -v counts them: a stack frame alone (e.g. libdevice
    sin/cos keeping its range-reduction array on the stack) is not a spill. Assembled for the
    PTX's own .target (sm_90a for sm_90) with the assembler Triton used."""
    src = tmp / "kernel.ptx"
    src.write_text(ptx)
    gpu = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, flags=re.MULTILINE)
    if gpu is None:
        raise ToolError("the PTX names no .target")
    log = _run_tool(tools, "ptxas", "-v", f"--gpu-name={gpu.group(1)}", str(src), "-o",
                    str(tmp / "v.cubin")).stderr
    found = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if found is None:
        raise ToolError(f"ptxas -v printed no spill figures: {log.strip()[-200:]!r}")
    return {"spill_stores": int(found.group(1)), "spill_loads": int(found.group(2))}


def _sass_counts(tools: dict, cubin: Path) -> dict[str, int]:
    """SASS instruction counts: HGMMA, HMMA and FFMA."""
    sass = _run_tool(tools, "nvdisasm", str(cubin)).stdout
    return {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("HGMMA", "HMMA", "FFMA")}


def inexact_math(ptx: str) -> list[str]:
    """The PTX's approximate floating-point instructions (sqrt.approx.f32, div.full.f32, ...)."""
    return sorted(set(re.findall(r"\b[a-z0-9]+\.(?:approx|full)(?:\.[a-z0-9]+)*", ptx)))


def compile_launch(launch, arch: int) -> dict:
    """The compiler's report for one launch on sm_{arch}: {"error"} or registers, spills, shared,
    SASS counts and the PTX's approximate math."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(launch.kernel, launch.signature, launch.constexprs, launch.attrs),
                                  target=GPUTarget("cuda", arch, 32), options=launch.options)
    except Exception as e:   # a compile error is a finding, not a crash of the report
        message = str(e).strip().splitlines()
        return {"error": f"does not compile for sm_{arch}: {type(e).__name__}: {message[-1] if message else ''}"}
    try:
        tools = nvidia_tools(arch)
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "kernel.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            result = {**_resource_usage(tools, cubin), "shared": compiled.metadata.shared, "spill_stores": 0,
                      "spill_loads": 0}
            if result["stack"] or result["local"]:   # only then is it worth a second ptxas run
                result.update(_ptxas_spills(tools, compiled.asm["ptx"], Path(tmp)))
            result["sass"] = _sass_counts(tools, cubin)
    except ToolError as e:
        return {"error": str(e)}
    result["uses_dot"] = "tt.dot" in compiled.asm["ttir"]
    result["inexact_math"] = inexact_math(compiled.asm["ptx"])
    result["compile_s"] = round(time.perf_counter() - start, 2)   # ~0 when Triton's disk cache had it
    return result


def tensor_cores(result: dict) -> str:
    """The matmul path of a dot kernel: HGMMA, HMMA or none (FFMA); '-' without tl.dot."""
    if "error" in result or not result["uses_dot"]:
        return "-"
    sass = result["sass"]
    for op in ("HGMMA", "HMMA"):
        if sass[op]:
            return f"{op} x{sass[op]}"
    return f"none (FFMA x{sass['FFMA']})"


def problems(result: dict, hw) -> list[str]:
    """Why a compiled launch is not fit for the card `hw`: compile or tool error, register spills
    (beyond a few bytes at a low register count), registers or shared memory over its limits."""
    if "error" in result:
        return [result["error"]]
    found = []
    harmless = result["spill_stores"] <= SMALL_SPILL_BYTES and result["registers"] < LOW_REGISTERS
    if result["spill_stores"] and not harmless:
        found.append(f"spills registers: {result['spill_stores']} B spill stores, {result['spill_loads']} B spill "
                     f"loads per thread at {result['registers']} registers (stack frame {result['stack']} B)")
    if result["registers"] > MAX_REGISTERS:
        found.append(f"uses {result['registers']} registers per thread, over the {MAX_REGISTERS} limit")
    if result["shared"] > hw.shared_memory_per_block:
        found.append(f"needs {result['shared']} B of shared memory, over the {hw.shared_memory_per_block} B a block "
                     f"may use on the {hw.name}")
    return found


def report(launches, arch: int) -> list[dict]:
    """One row per launch for sm_{arch}; each distinct binary is compiled once."""
    from bench.launches import roofline_seconds
    hw, compiled, rows = TARGETS[arch], {}, []
    for launch in launches:
        key = launch.key()
        if key not in compiled:
            compiled[key] = compile_launch(launch, arch)
        result = compiled[key]
        rows.append({"kernel": launch.name, "config": launch.config, "shape": launch.shape,
                     "models": launch.models, "grid": list(launch.grid), **result,
                     "tensor_cores": tensor_cores(result), "problems": problems(result, hw),
                     "signature": launch.signature, "problem": launch.cost.problem, "bytes": launch.cost.bytes,
                     "flops": launch.cost.flops, "roofline_us": roofline_seconds(launch.cost, hw) * 1e6})
    return rows


def notes(hw) -> str:
    from bench.launches import DECODE_LEN, SEQ_LEN, TOKENS
    return f"""\
Notes
- Spills: bytes of spill stores per thread (ptxas -v, run when cuobjdump shows a STACK or LOCAL
  frame); the frame size follows in parentheses. Every spill is a problem except a few bytes (<= 16)
  far below the register cap (< 128): rope's 8 B at 32 registers sit in libdevice's inlined sin/cos
  slow path (Payne-Hanek range reduction into a local array, taken for |angle| > ~1e5 only), not
  register pressure. Registers: at most {MAX_REGISTERS} per thread. Shared: Triton's dynamic shared memory
  per block (the 1 KB the driver reserves is not counted), limit {hw.shared_memory_per_block} B on the {hw.name}.
- Tensor cores, for kernels that call tl.dot. HGMMA is wgmma, Hopper's fast path (sm_90 only); HMMA
  (mma.sync) is the tensor-core path of sm_80/sm_89. fp32 launches use `input_precision="ieee"`
  (exact fp32 products, as the tests require), which has no tensor-core instruction: FFMA is
  expected there and their roofline uses the fp32 CUDA-core rate. Decode attention puts the GQA
  group (padded to 16 rows) on the M side of its dots; wgmma needs tiles of at least 64 rows per
  warp group, so Triton lowers them to HMMA: fine for a kernel bound by reading the KV cache.
- Roofline on the {hw.name}: max(bytes / {hw.roofline_bytes_per_second / 1e12:.3g} TB/s, FLOPs / peak), peak =
  {hw.roofline_matmul_flops / 1e12:.4g} TFLOP/s for bf16 tensor-core dots, {hw.peak_fp32_flops / 1e12:.4g} TFLOP/s (fp32)
  otherwise (kernels/hardware.py: measured ceilings where the table has them, else the datasheet). Bytes
  count each operand once (the loss's row kernel reads its logits chunk twice when it writes
  dlogits). Training problems: one micro-batch of {TOKENS} tokens ({TOKENS // SEQ_LEN} sequences of {SEQ_LEN} for
  attention); decode: {DECODE_LEN} cached tokens.
"""


def table(rows: list[dict]) -> list[str]:
    """The report's markdown table: one row per launch."""
    def compiled(r):
        if "error" in r:
            return ["-", "-", "-", "error"]
        return [r["registers"], f"{r['spill_stores']} ({r['stack'] + r['local']})", r["shared"], r["tensor_cores"]]
    body = [[r["kernel"], f"`{r['config']}`", r["shape"], ", ".join(r["models"]) or "-", *compiled(r),
             f"{r['roofline_us']:.1f}"] for r in rows]
    return common.table(["kernel", "config", "shape", "models", "regs", "spills B (frame)", "shared B", "tensor cores",
                         "roofline us"], body)


def markdown(rows: list[dict], arch: int, triton_version: str) -> str:
    hw = TARGETS[arch]
    failing = [r for r in rows if r["problems"]]
    lines = [f"# Triton kernels compiled for sm_{arch} ({hw.name}), static report", "",
             f"Made by triton {triton_version}; {len(rows)} launches, "
             f"{len({(r['kernel'], r['config']) for r in rows})} kernel configs; {len(failing)} with problems.", ""]
    lines += [f"- **{r['kernel']}** `{r['config']}` ({r['shape']}): {'; '.join(r['problems'])}" for r in failing]
    return "\n".join(lines + [""] + table(rows) + ["", notes(hw)])


def print_problems(rows: list[dict], arch: int) -> None:
    failing = [r for r in rows if r["problems"]]
    print(f"sm_{arch} ({TARGETS[arch].name}): {len(rows)} launches, {len(failing)} with problems")
    for r in failing:
        for problem in r["problems"]:
            print(f"PROBLEM sm_{arch} {r['kernel']} {r['config']} ({r['shape']}): {problem}")


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(text, text)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="kernels", description="Compile every Triton launch for sm_80, sm_89 and "
                                "sm_90 and report registers, spills, shared memory, tensor-core instructions and "
                                "roofline times, each against its card's limits.")
    p.add_argument("--arch", type=int, action="append", choices=sorted(TARGETS),
                   help="compute capability to compile for (repeatable; default: all of "
                        f"{', '.join(map(str, sorted(TARGETS)))})")
    p.add_argument("--out", type=Path, help="folder for kernels-static-sm{arch}.json and .md")
    p.add_argument("--only", default="", help="regex over 'kernel config shape' selecting launches")
    p.add_argument("--subset", action="store_true", help="only the representative launches of the default tests")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="replace a constexpr or option (num_warps, num_stages) in the selected launches")
    p.add_argument("--quiet", action="store_true", help="no table on stdout (problems are still printed)")
    return p.parse_args(argv)


def _interpreting() -> bool:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    dispatch = sys.modules.get("kernels.dispatch")
    return bool(dispatch and dispatch.INTERPRETING)


def run_isolated(argv) -> int:
    """main(argv) in a fresh process with the interpreter off (for callers that have it on)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "bench.kernel_report", *argv], cwd=root, env=env).returncode


def _select(launches, args, changes):
    selected = [l for l in launches if (l.representative or not args.subset)
                and re.search(args.only, f"{l.name} {l.config} {l.shape}")]
    return [l.with_changes(**changes) for l in selected]


def main(argv=None) -> int:
    """`python cli.py kernels [options]`: returns 0 when every selected launch passes the checks
    on every selected target."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if (missing := tools_missing()) is not None:
        print(f"error: kernel report {missing}; pip install triton", file=sys.stderr)
        return 2
    if _interpreting():
        return run_isolated(argv)
    import triton
    from bench.launches import registry
    changes = {k: _parse_value(v) for k, v in (item.split("=", 1) for item in args.set)}
    failed = False
    for arch in args.arch or sorted(TARGETS):
        everything = registry(TARGETS[arch])
        try:
            launches = _select(everything, args, changes)
        except KeyError as e:
            print(f"error: --set: {e.args[0]}", file=sys.stderr)
            return 2
        if not launches:
            print(f"error: no launch matches --only {args.only!r}", file=sys.stderr)
            return 2
        rows = report(launches, arch)
        if not args.quiet:
            print(f"== sm_{arch} ({TARGETS[arch].name})", *table(rows), sep="\n")
        print_problems(rows, arch)
        failed |= any(r["problems"] for r in rows)
        if args.out:
            meta = {"triton": triton.__version__, "target": f"cuda sm_{arch}", "arch": arch,
                    "hardware": TARGETS[arch].name, "shared_limit": TARGETS[arch].shared_memory_per_block,
                    "tools": tool_versions(arch), "changes": changes,
                    "registry_kernels": sorted({l.name for l in everything})}
            common.write_results(args.out, report_name(arch), {**meta, "rows": rows},
                                 markdown(rows, arch, triton.__version__))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
