"""What the compiler says about every Triton launch on an H100, without a GPU.

    python -m bench.kernel_report --out bench/results            # the whole registry
    python -m bench.kernel_report --subset --only attn_fwd         # the test subset, one kernel
    python -m bench.kernel_report --only attn_fwd --set BLOCK_M=256 --set num_stages=4   # what-if

Compiles each launch of kernels/launches.py for sm_90 (triton.compile with GPUTarget("cuda", 90,
32), the interpreter off), then reads the binary with the CUDA tools the Triton wheel carries:
registers and spills (cuobjdump --dump-resource-usage: LOCAL / STACK bytes per thread), shared
memory (Triton's metadata.shared, against the 227 KB a block may use), and for kernels that
call tl.dot the tensor-core instructions in the SASS (nvdisasm): HGMMA (wgmma) is the Hopper
path, HMMA (mma.sync) the Ampere one, none (FFMA) no tensor cores. Each row also gets its
roofline time on an H100 (launches.roofline_seconds), so a GPU timing reads as "x% of roofline".
Writes kernels-static-sm90.json and .md under --out; exits 1 when a launch fails a check
(compile error, spills, shared memory over the limit).

Compiled binaries are cached within a run (one compile per distinct binary) and on disk by
Triton itself (~/.triton/cache, keyed by triton version, kernel source and specialization).
Under TRITON_INTERPRET=1 (the tests) main() reruns itself in a subprocess without it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SHARED_LIMIT = 227 * 1024      # bytes of shared memory one block may use on an H100
# A few spilled bytes far below the register cap are not register pressure (see NOTES: rope)
SMALL_SPILL_BYTES, LOW_REGISTERS = 16, 128
REPORT_NAME = "kernels-static-sm90"
TOOLS = ("cuobjdump", "nvdisasm", "ptxas")


def tools_dir() -> Path | None:
    """The wheel's NVIDIA tools, or None when triton or its nvidia backend is missing."""
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return path if all((path / tool).is_file() for tool in TOOLS) else None


def _resource_usage(cubin: Path) -> dict:
    out = subprocess.run([str(tools_dir() / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                         capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {"registers": int(found["REG"]), "stack": int(found["STACK"]), "local": int(found["LOCAL"])}


def _ptxas_spills(ptx: str, tmp: Path) -> dict:
    """Spill stores and loads (bytes) as ptxas -v counts them: a stack frame alone (e.g. libdevice
    sin/cos keeping its range-reduction array on the stack) is not a spill."""
    src = tmp / "kernel.ptx"
    src.write_text(ptx)
    log = subprocess.run([str(tools_dir() / "ptxas"), "-v", "--gpu-name=sm_90a", str(src), "-o", str(tmp / "v.cubin")],
                         capture_output=True, text=True, check=True).stderr
    stores, loads = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups()
    return {"spill_stores": int(stores), "spill_loads": int(loads)}


def _tensor_core_ops(cubin: Path) -> dict[str, int]:
    """SASS instruction counts: HGMMA, HMMA and FFMA."""
    sass = subprocess.run([str(tools_dir() / "nvdisasm"), str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    return {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("HGMMA", "HMMA", "FFMA")}


def compile_launch(launch) -> dict:
    """The compiler's report for one launch: {"error"} or registers, spills, shared, SASS counts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    try:
        compiled = triton.compile(ASTSource(launch.kernel, launch.signature, launch.constexprs, launch.attrs),
                                  target=GPUTarget("cuda", 90, 32), options=launch.options)
    except Exception as e:   # a compile error is a finding, not a crash of the report
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"}
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        result = {**_resource_usage(cubin), "shared": compiled.metadata.shared, "spill_stores": 0, "spill_loads": 0}
        if result["stack"] or result["local"]:   # only then is it worth a second ptxas run
            result.update(_ptxas_spills(compiled.asm["ptx"], Path(tmp)))
        result["uses_dot"] = "tt.dot" in compiled.asm["ttir"]
        result["sass"] = _tensor_core_ops(cubin)
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


def problems(result: dict) -> list[str]:
    """Why a compiled launch is not fit for the H100: compile error, register spills (beyond a few
    bytes at a low register count), shared memory over the limit."""
    if "error" in result:
        return [f"does not compile for sm_90: {result['error']}"]
    found = []
    harmless = result["spill_stores"] <= SMALL_SPILL_BYTES and result["registers"] < LOW_REGISTERS
    if result["spill_stores"] and not harmless:
        found.append(f"spills registers: {result['spill_stores']} B spill stores, {result['spill_loads']} B spill "
                     f"loads per thread at {result['registers']} registers (stack frame {result['stack']} B)")
    if result["shared"] > SHARED_LIMIT:
        found.append(f"needs {result['shared']} B of shared memory, over the {SHARED_LIMIT} B (227 KB) limit")
    return found


def report(launches) -> list[dict]:
    """One row per launch; each distinct binary is compiled once."""
    from kernels.launches import roofline_seconds
    compiled, rows = {}, []
    for launch in launches:
        key = launch.key()
        if key not in compiled:
            compiled[key] = compile_launch(launch)
        result = compiled[key]
        rows.append({"kernel": launch.name, "config": launch.config, "shape": launch.shape,
                     "models": launch.models, "grid": list(launch.grid), **result,
                     "tensor_cores": tensor_cores(result), "problems": problems(result),
                     "signature": launch.signature, "problem": launch.cost.problem, "bytes": launch.cost.bytes,
                     "flops": launch.cost.flops, "roofline_us": roofline_seconds(launch.cost) * 1e6})
    return rows


NOTES = """\
Notes
- Spills: bytes of spill stores per thread (ptxas -v, run when cuobjdump shows a STACK or LOCAL
  frame); the frame size follows in parentheses. Every spill is a problem except a few bytes (<= 16)
  far below the register cap (< 128): rope's 8 B at 32 registers sit in libdevice's inlined sin/cos
  slow path (Payne-Hanek range reduction into a local array, taken for |angle| > ~1e5 only), not
  register pressure. Shared: Triton's
  dynamic shared memory per block (the 1 KB the driver reserves is not counted), limit 227 KB.
- Tensor cores, for kernels that call tl.dot. HGMMA is wgmma, Hopper's fast path. fp32 launches use
  `input_precision="ieee"` (exact fp32 products, as the tests require), which has no tensor-core
  instruction: FFMA is expected there and their roofline uses the fp32 CUDA-core rate. Decode
  attention puts the GQA group (padded to 16 rows) on the M side of its dots; wgmma needs tiles of
  at least 64 rows per warp group, so Triton lowers them to HMMA (mma.sync): fine for a kernel bound
  by reading the KV cache.
- Roofline: max(bytes / 3.0 TB/s, FLOPs / peak), peak = 780 TFLOP/s (measured bf16 matmul) for bf16
  tensor-core dots, 67 TFLOP/s (datasheet fp32) otherwise. Bytes count each operand once (the
  loss's row kernel reads its logits chunk twice when it writes dlogits). Training problems: one
  micro-batch of 16384 tokens (64 sequences of 256 for attention); decode: 512 cached tokens.
"""


def markdown(rows: list[dict], triton_version: str) -> str:
    failing = [r for r in rows if r["problems"]]
    lines = [f"# Triton kernels compiled for sm_90 (H100), static report", "",
             f"triton {triton_version}; {len(rows)} launches, {len({(r['kernel'], r['config']) for r in rows})} "
             f"kernel configs; {len(failing)} with problems.", ""]
    lines += [f"- **{r['kernel']}** `{r['config']}` ({r['shape']}): {'; '.join(r['problems'])}" for r in failing]
    lines += ["", "| kernel | config | shape | models | regs | spills B (frame) | shared B | tensor cores | "
              "roofline us |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            cells = ["-", "-", "-", "compile error"]
        else:
            cells = [str(r["registers"]), f"{r['spill_stores']} ({r['stack'] + r['local']})", str(r["shared"]),
                     r["tensor_cores"]]
        lines.append(f"| {r['kernel']} | `{r['config']}` | {r['shape']} | {', '.join(r['models']) or '-'} | "
                     + " | ".join(cells) + f" | {r['roofline_us']:.1f} |")
    return "\n".join(lines + ["", NOTES])


def print_table(rows: list[dict]) -> None:
    print(f"{'kernel':28} {'config':60} {'shape':44} {'regs':>4} {'spill':>7} {'shared':>7} "
          f"{'tensor cores':18} {'roofline':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['kernel']:28} {r['config']:60} {r['shape']:44} COMPILE ERROR {r['error']}")
            continue
        print(f"{r['kernel']:28} {r['config']:60} {r['shape']:44} {r['registers']:4} "
              f"{r['spill_stores']:7} {r['shared']:7} {r['tensor_cores']:18} {r['roofline_us']:8.1f}us")
    for r in rows:
        for problem in r["problems"]:
            print(f"PROBLEM {r['kernel']} {r['config']} ({r['shape']}): {problem}")


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(text, text)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="kernels", description="Compile every Triton launch for sm_90 and report "
                                "registers, spills, shared memory, tensor-core instructions and roofline times.")
    p.add_argument("--out", type=Path, help=f"folder for {REPORT_NAME}.json and .md")
    p.add_argument("--only", default="", help="regex over 'kernel config shape' selecting launches")
    p.add_argument("--subset", action="store_true", help="only the representative launches of the default tests")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="replace a constexpr or option (num_warps, num_stages) in the selected launches")
    p.add_argument("--quiet", action="store_true", help="no table on stdout")
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


def main(argv=None) -> int:
    """`python cli.py kernels [options]`: returns 0 when every selected launch passes the checks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if tools_dir() is None:
        print("kernel report: needs triton with its nvidia backend tools (cuobjdump, nvdisasm): pip install triton",
              file=sys.stderr)
        return 2
    if _interpreting():
        return run_isolated(argv)
    import triton
    from kernels.launches import registry
    everything = registry()
    launches = [l for l in everything if (l.representative or not args.subset)
                and re.search(args.only, f"{l.name} {l.config} {l.shape}")]
    if not launches:
        print(f"kernel report: no launch matches --only {args.only!r}", file=sys.stderr)
        return 2
    changes = dict(item.split("=", 1) for item in args.set)
    launches = [l.with_changes(**{k: _parse_value(v) for k, v in changes.items()}) for l in launches]
    rows = report(launches)
    if not args.quiet:
        print_table(rows)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"triton": triton.__version__, "target": "cuda sm_90", "shared_limit": SHARED_LIMIT,
                "changes": changes, "registry_kernels": sorted({l.name for l in everything})}
        (args.out / f"{REPORT_NAME}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1, default=str))
        (args.out / f"{REPORT_NAME}.md").write_text(markdown(rows, triton.__version__))
    return 1 if any(r["problems"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
