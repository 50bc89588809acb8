"""What memorization costs per model size, sweeps over models x languages x lengths, and our
accuracy beside the paper's Tables 1 and 2.

    rows, table = profile(["qwen2-0.5b", "bloom-1b7"])      # cli.py profile
    results = sweep(["qwen2-0.5b"], ["cn"], [256, 512])      # cli.py sweep
    markdown = report(["runs/sweep/qwen2-0.5b-cn-256"])      # cli.py report

Cost model (ANCHORS.md): a trained token costs 6N FLOPs (N: the parameters that take part in
matmuls, the tied output matrix once) plus causal attention 6·L·d·(s+1) per sequence of s tokens
(12·L·d·ctx per token with ctx the keys a token attends to, (s+1)/2 on average), d = heads x
head_dim. Time comes from a throughput benchmark of this device (bench/results/throughput-*.json)
when one exists, else it is projected on an H100 at ASSUMED_MFU and marked "projected".
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from engine.data import encode_examples, load_poems, model_format
from engine.report import epoch_curve, pyplot, read_jsonl
from models import REGISTRY, PAPER_MODELS, ModelConfig, read_tokenizer_dir
from models.registry import TINY_TOKENIZER, cached_snapshot

ROOT = Path(__file__).resolve().parent.parent

# "Schrödinger's Memory: Large Language Models", Table 1 (CN / ENG poems, prompt + poem <= 256
# characters) and Table 2 (CN, 256-512 characters): exact-recitation accuracy in % after 100 epochs.
PAPER_ACCURACY = {
    ("cn", 256): {"qwen1.5-0.5b": 68.85, "qwen2-0.5b": 77.5, "qwen2-1.5b": 96.9, "bloom-389m-zh": 75.55,
                  "bloom-1b4-zh": 96.6},
    ("en", 256): {"qwen1.5-0.5b": 99.85, "qwen2-0.5b": 99.85, "qwen2-1.5b": 99.9, "bloom-560m": 99.2,
                  "bloom-1b7": 99.15},
    ("cn", 512): {"qwen1.5-0.5b": 44.9, "qwen2-0.5b": 56.85, "qwen2-1.5b": 86.95, "bloom-389m-zh": 68.6,
                  "bloom-1b4-zh": 93.65},
}

# Projection when no benchmark of this device exists: one H100 SXM (dense bf16 peak, HBM3).
H100_PEAK_FLOPS = 989e12
H100_BYTES_PER_SECOND = 3.35e12
ASSUMED_MFU = 0.40                 # training and prefill (ANCHORS.md: 33-56% for well-tuned stacks)
ASSUMED_BANDWIDTH_USE = 0.60       # decode: share of HBM bandwidth reached reading weights + KV cache
EVAL_BATCH = 256                   # sequences decoded together in a recitation evaluation
PROJECTED = f"projected (H100, {ASSUMED_MFU:.0%} of {H100_PEAK_FLOPS / 1e12:.0f} TFLOP/s)"
BF16, FP32 = 2, 4


# ---------------------------------------------------------------- model shapes and costs

def model_config(name: str) -> ModelConfig:
    """The architecture of a registry name or a model folder, without downloading anything."""
    if Path(name).is_dir():
        return ModelConfig.from_file(Path(name) / "config.json")
    spec = REGISTRY.get(name)
    if spec is None:
        raise ValueError(f"unknown model {name!r}: not a folder and not one of {', '.join(REGISTRY)}")
    snapshot = cached_snapshot(spec.repo) if spec.repo else None
    if snapshot is not None:
        return ModelConfig.from_file(snapshot / "config.json")
    if spec.config:
        return ModelConfig.from_dict(spec.config, f"registry shape of {name}")
    raise FileNotFoundError(f"the shape of {name} is unknown offline: download its config.json "
                            f"(huggingface-cli download {spec.repo} config.json)")


def count_parameters(config: ModelConfig) -> int:
    """All parameters (a tied output matrix once), counted on the meta device: nothing is allocated."""
    from models import model_class
    with torch.device("meta"):
        return model_class(config)(config).num_parameters()


def matmul_parameters(config: ModelConfig, parameters: int) -> int:
    """N of 6N: an untied input embedding is a lookup, not a matmul."""
    return parameters - (0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size)


def train_flops(config: ModelConfig, parameters: int, seq_lens: list[int]) -> float:
    """FLOPs of one training pass (forward + backward) over sequences of these lengths."""
    n = matmul_parameters(config, parameters)
    d = config.num_heads * config.head_dim
    return sum(6 * n * s + 6 * config.num_layers * d * s * (s + 1) for s in seq_lens)


def activation_bytes(config: ModelConfig, tokens: int) -> int:
    """Activations kept for backward by one packed micro-batch of `tokens` tokens (bf16), no recompute.

    Per token and layer: the two norms' inputs and outputs (4h), q and attention output (2·q_dim),
    k and v (2·kv_dim), and the MLP's saved tensors: gate, up and their product (3·I) for SwiGLU,
    fc1 and gelu outputs (2·I) for BLOOM; flash attention keeps no s x s scores. On top: the final
    norm (2h per token) and the fused linear cross-entropy's peak (kernels.linear_cross_entropy.
    chunk_plan: fp32 logits chunk, fp32 output-matrix gradient, bf16 hidden gradient).
    """
    from kernels.linear_cross_entropy import chunk_plan
    h, q_dim, kv_dim = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    mlp = (3 if config.model_type == "qwen2" else 2) * config.intermediate_size
    per_token = config.num_layers * (4 * h + 2 * q_dim + 2 * kv_dim + mlp) + 2 * h
    head = chunk_plan(tokens, h, config.vocab_size, torch.bfloat16).peak_extra_bytes
    return BF16 * per_token * tokens + head


def memory_split(config: ModelConfig, parameters: int, micro_batch_tokens: int) -> dict:
    """Peak training memory on a GPU: bf16 weights and gradients, fp32 master weights and two fp32
    AdamW moments (engine/optim.py), activations of one micro-batch."""
    parts = {"weights": BF16 * parameters, "gradients": BF16 * parameters, "optimizer": 3 * FP32 * parameters,
             "activations": activation_bytes(config, micro_batch_tokens)}
    return {**parts, "total": sum(parts.values())}


def projected_eval_seconds(config: ModelConfig, parameters: int, prompt_tokens: list[int],
                           target_tokens: list[int]) -> float:
    """One recitation evaluation on an H100: prefill at ASSUMED_MFU, then decode steps of EVAL_BATCH
    sequences, each reading the bf16 weights and the batch's KV cache at ASSUMED_BANDWIDTH_USE."""
    from models import KVCache
    prefill = 2 * matmul_parameters(config, parameters) * sum(prompt_tokens) / (H100_PEAK_FLOPS * ASSUMED_MFU)
    mean_context = (sum(prompt_tokens) + sum(target_tokens) / 2) / len(target_tokens)
    step_bytes = BF16 * parameters + EVAL_BATCH * mean_context * KVCache.bytes_per_token(config, torch.bfloat16)
    steps = sum(target_tokens) / EVAL_BATCH
    return prefill + steps * step_bytes / (H100_BYTES_PER_SECOND * ASSUMED_BANDWIDTH_USE)


# ---------------------------------------------------------------- inputs: tokens, benchmarks, runs

def model_tokenizer(name: str):
    """(tokenizer, note): the model's own when its files are local, else the tiny tokenizer as a proxy."""
    spec = REGISTRY.get(name)
    directory = Path(name) if Path(name).is_dir() else (cached_snapshot(spec.repo) if spec and spec.repo else None)
    if directory is not None and (directory / "tokenizer.json").is_file():
        return read_tokenizer_dir(directory), "own"
    if spec is not None and spec.repo is None:
        return read_tokenizer_dir(TINY_TOKENIZER), "own"
    return read_tokenizer_dir(TINY_TOKENIZER), "tiny proxy"


def this_device() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def load_bench(bench_dir, device: str | None = None) -> dict | None:
    """The throughput benchmark (bench/throughput.py's JSON) recorded on this device, if any."""
    device = device or this_device()
    for path in sorted(Path(bench_dir).glob("throughput-*.json")):
        bench = json.loads(path.read_text()) if not path.name.endswith("-detail.json") else {}
        if bench.get("device") == device and "models" in bench:
            return {**bench, "path": str(path)}
    return None


def find_runs(run_dirs=None, root="runs") -> list[dict]:
    """results.json of finished memorize runs (the given folders, or every one under `root`), with run_dir."""
    paths = ([Path(d) / "results.json" for d in run_dirs] if run_dirs is not None
             else sorted(Path(root).glob("**/results.json")))
    runs = []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path.parent} holds no results.json: it is not a finished memorize run")
        runs.append({**json.loads(path.read_text(encoding="utf-8")), "run_dir": str(path.parent)})
    return runs


def run_gpu_seconds(run: dict) -> float:
    return (run["train_seconds"] + run["eval_seconds"]) * run.get("world_size", 1)


# ---------------------------------------------------------------- profile

def profile(models: list[str] | None = None, lang: str = "cn", length: int = 256, n_poems: int = 2000,
            bench_dir="bench/results", runs=None, epochs: int = 100, eval_every: int = 10,
            micro_batch_tokens: int = 8192, source=None, seed: int = 0, out="runs/profile") -> tuple[list[dict], str]:
    """Per model: parameters, tokens, FLOPs, time and GPU-hours of the `epochs`-epoch experiment,
    peak memory by part, and accuracy and cost per memorized poem of matching finished runs.
    Writes profile.json and profile.png into `out` (None: nothing written)."""
    models = models or PAPER_MODELS
    poems = load_poems(lang, length, n_poems, seed, source)
    bench = load_bench(bench_dir)
    matching = {}
    for run in find_runs(runs):
        if (run["lang"], run["length"]) == (lang, length):
            matching[run["model"]] = run
    encoded = {}
    rows = []
    for name in models:
        config = model_config(name)
        params = count_parameters(config)
        tokenizer, tok_note = model_tokenizer(name)
        fmt = model_format(name, tokenizer)
        key = (str(tokenizer.source_dir), fmt)
        if key not in encoded:
            encoded[key] = encode_examples(poems, tokenizer, lang, fmt)
        examples = encoded[key]
        tokens = sum(len(e) for e in examples)
        flops = train_flops(config, params, [len(e) for e in examples])
        measured = (bench or {}).get("models", {}).get(name)
        measured = measured if measured and "train_tokens_per_second" in measured else None
        epoch_s, eval_s, basis = seconds_per_epoch_and_eval(config, params, examples, flops, measured, bench)
        evals = math.ceil(epochs / eval_every)
        row = {"model": name, "parameters": params, "tokenizer": tok_note, "format": fmt, "poems": len(examples),
               "tokens_per_epoch": tokens, "flops_per_epoch": flops, "flops_total": flops * epochs,
               "epoch_seconds": epoch_s, "eval_seconds": eval_s,
               "gpu_hours": (epochs * epoch_s + evals * eval_s) / 3600, "basis": basis,
               "projected": not measured, "memory": memory_split(config, params, micro_batch_tokens),
               "measured_peak_memory_bytes": measured.get("peak_memory_bytes") if measured else None,
               "paper_accuracy": PAPER_ACCURACY.get((lang, length), {}).get(name)}
        run = matching.get(name)
        if run:
            memorized = run["accuracy"] * run["n_poems"]
            row.update(accuracy=100 * run["accuracy"], run_dir=run["run_dir"], run_poems=run["n_poems"],
                       run_epochs=run["epochs"],
                       gpu_seconds_per_poem=run_gpu_seconds(run) / memorized if memorized else None)
        rows.append(row)
    table = profile_table(rows, lang, length, epochs, eval_every, micro_batch_tokens)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "profile.json").write_text(json.dumps(rows, indent=2))
        plot_profile(rows, Path(out) / "profile.png", f"{lang}-{length}, {epochs} epochs")
    return rows, table


def seconds_per_epoch_and_eval(config, params, examples, flops, measured: dict | None, bench: dict | None):
    """(training seconds per epoch, seconds per evaluation, basis): from this device's benchmark of the
    model when there is one, else projected on an H100."""
    prompt_tokens = [len(e.prompt_ids) for e in examples]
    target_tokens = [len(e.target_ids) for e in examples]
    if measured:
        return (sum(prompt_tokens + target_tokens) / measured["train_tokens_per_second"],
                sum(target_tokens) / measured["eval_tokens_per_second"], f"measured ({bench['device']})")
    return (flops / (H100_PEAK_FLOPS * ASSUMED_MFU), projected_eval_seconds(config, params, prompt_tokens, target_tokens),
            PROJECTED)


def _gib(n) -> str:
    return f"{n / 2**30:.1f}"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def profile_table(rows: list[dict], lang: str, length: int, epochs: int, eval_every: int, micro_batch_tokens: int) -> str:
    body = []
    for r in rows:
        m = r["memory"]
        acc = f"{r['accuracy']:.2f}" if "accuracy" in r else "-"
        per_poem = f"{r['gpu_seconds_per_poem']:.2f}" if r.get("gpu_seconds_per_poem") else "-"
        body.append([r["model"], f"{r['parameters'] / 1e6:,.0f}M", f"{r['tokens_per_epoch']:,}"
                     + (" *" if r["tokenizer"] != "own" else ""), f"{r['flops_per_epoch'] / 1e15:.2f}",
                     f"{r['flops_total'] / 1e18:.2f}", _duration(r["epoch_seconds"]), f"{r['gpu_hours']:.3g}"
                     + ("" if r["projected"] else " (measured)"), _gib(m["weights"]), _gib(m["gradients"]),
                     _gib(m["optimizer"]), _gib(m["activations"]), _gib(m["total"]) + (
                         f" ({_gib(r['measured_peak_memory_bytes'])} measured)" if r["measured_peak_memory_bytes"] else ""),
                     acc,
                     "-" if r["paper_accuracy"] is None else r["paper_accuracy"], per_poem])
    header = ["model", "params", "tokens/epoch", "PFLOP/epoch", f"EFLOP/{epochs} ep", "time/epoch",
              f"GPU-h ({epochs} ep + eval)", "weights GiB", "grads GiB", "AdamW GiB",
              f"activ. GiB ({micro_batch_tokens} tok)", "peak GiB", "acc % (ours)", "acc % (paper)",
              "GPU-s per memorized poem"]
    notes = [f"Cost of memorizing {rows[0]['poems'] if rows else 0} {lang}-{length} poems for {epochs} epochs.",
             "Time: " + "; ".join(sorted({r["basis"] for r in rows})) + ". Projected evaluation: decode at "
             f"{ASSUMED_BANDWIDTH_USE:.0%} of {H100_BYTES_PER_SECOND / 1e12:.2f} TB/s, batch {EVAL_BATCH}, "
             f"one evaluation every {eval_every} epochs.",
             "FLOPs: 6N + causal attention 6·L·d·(s+1) per sequence of s tokens. Memory: bf16 weights and "
             "gradients, fp32 master + 2 moments, activations of one packed micro-batch (no recompute)."]
    notes += [f"Ours: {r['run_dir']} ({r['run_poems']} poems, {r['run_epochs']} epochs)." for r in rows if "run_dir" in r]
    if any(r["tokenizer"] != "own" for r in rows):
        notes.append("* tokens counted with the tiny tokenizer as a proxy: the model's tokenizer is not available "
                     "locally (real counts differ).")
    return markdown_table(header, body) + "\n\n" + "\n".join(notes)


def plot_profile(rows: list[dict], path: Path, title: str) -> Path:
    """Model size vs GPU-hours (left) and exact-recitation accuracy, ours and the paper's (right)."""
    plt = pyplot()
    rows = sorted(rows, key=lambda r: r["parameters"])
    fig, cost_ax = plt.subplots(figsize=(8, 4.5))
    sizes = [r["parameters"] / 1e6 for r in rows]
    cost_ax.plot(sizes, [r["gpu_hours"] for r in rows], "s-", color="tab:blue")
    for x, r in zip(sizes, rows):
        cost_ax.annotate(r["model"], (x, r["gpu_hours"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    cost_ax.set_xscale("log")
    cost_ax.set_xlabel("parameters (millions)")
    cost_ax.set_ylabel("GPU-hours, training + evaluation", color="tab:blue")
    acc_ax = cost_ax.twinx()
    for key, marker, label in (("accuracy", "o", "ours"), ("paper_accuracy", "^", "paper")):
        points = [(x, r[key]) for x, r in zip(sizes, rows) if r.get(key) is not None]
        if points:
            acc_ax.scatter(*zip(*points), marker=marker, color="tab:red", label=f"accuracy ({label})",
                           facecolors="none" if label == "paper" else "tab:red")
    acc_ax.set_ylim(0, 100)
    acc_ax.set_ylabel("exact recitation accuracy (%)", color="tab:red")
    if acc_ax.get_legend_handles_labels()[0]:
        acc_ax.legend(loc="lower right", fontsize=8)
    cost_ax.set_title(f"Cost of memorization by model size ({title})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- sweep

def run_dir(out_root, model: str, lang: str, length: int) -> Path:
    return Path(out_root) / f"{Path(model).name}-{lang}-{length}"


def sweep(models: list[str], langs: list[str], lengths: list[int], out_root="runs/sweep",
          **train_overrides) -> list[dict]:
    """memorize() for every (model, lang, length), then report() over the finished runs.

    A run whose folder holds results.json is skipped; one with a checkpoint is resumed. One GPU or
    none: the runs go one after the other in this process; several GPUs: one `cli.py memorize`
    subprocess per GPU (CUDA_VISIBLE_DEVICES), its log in the run folder's memorize.log.
    train_overrides: TrainConfig fields (epochs=, poems=, lr=, ...); a dict value is looked up by
    language (source={"en": "poems-en.jsonl"}). Returns the finished runs' results.json.
    """
    from engine.train import TrainConfig, latest_checkpoint
    pending = []
    for model in models:
        for lang in langs:
            for length in lengths:
                out = run_dir(out_root, model, lang, length)
                if (out / "results.json").is_file():
                    print(f"sweep: {out} is finished, skipped", file=sys.stderr)
                    continue
                overrides = {k: v.get(lang) if isinstance(v, dict) else v for k, v in train_overrides.items()}
                pending.append(TrainConfig(model=model, lang=lang, length=length, out=str(out),
                                           resume=latest_checkpoint(out) is not None, **overrides))
    gpus = torch.cuda.device_count()
    failures = _run_subprocesses(pending, gpus) if gpus > 1 else _run_in_process(pending)
    finished = [run_dir(out_root, m, lang, n) for m in models for lang in langs for n in lengths]
    finished = [d for d in finished if (d / "results.json").is_file()]
    if finished:
        report([str(d) for d in finished], out=out_root)
    if failures:
        raise RuntimeError("sweep: these runs failed (finished ones are reported in "
                           f"{Path(out_root) / 'report.md'}; run the sweep again to resume):\n  " + "\n  ".join(failures))
    return find_runs(finished)


def _run_in_process(configs) -> list[str]:
    from engine.train import memorize
    failures = []
    for config in configs:
        try:
            memorize(config)
        except Exception as e:          # the other runs still go; the failure is reported at the end
            failures.append(f"{config.out}: {type(e).__name__}: {e}")
    return failures


def cli_arguments(config) -> list[str]:
    """`cli.py memorize` arguments for a TrainConfig (fields left at None take the CLI's defaults too)."""
    from engine.train import TrainConfig
    defaults = asdict(TrainConfig(model=config.model))
    args = ["memorize", "--model", config.model, "--out", config.out] + (["--resume"] if config.resume else [])
    for key, value in asdict(config).items():
        if key in ("lang", "length") or (key not in ("model", "out", "resume") and value != defaults[key]):
            args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def _run_subprocesses(configs, gpus: int) -> list[str]:
    queue, running, failures = list(configs), {}, []
    while queue or running:
        for gpu in [g for g in range(gpus) if g not in running]:
            if not queue:
                break
            config = queue.pop(0)
            log = (Path(config.out) / "memorize.log")
            log.parent.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
            running[gpu] = (config, subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *cli_arguments(config)],
                                                     env=env, stdout=log.open("a"), stderr=subprocess.STDOUT))
        for gpu, (config, proc) in list(running.items()):
            if proc.poll() is not None:
                del running[gpu]
                if proc.returncode:
                    failures.append(f"{config.out}: exit status {proc.returncode}, see {config.out}/memorize.log")
        time.sleep(1)
    return failures


# ---------------------------------------------------------------- report

def display_name(model: str) -> str:
    """The paper's name for a registry model (its hub repository's name)."""
    spec = REGISTRY.get(model)
    return spec.repo.split("/")[-1] if spec and spec.repo else Path(model).name


def _percent(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def accuracy_tables(runs: list[dict]) -> str:
    """Our accuracy beside the paper's, in the layout of its Table 1 (CN / ENG) and Table 2 (CN 256-512)."""
    ours = {(r["model"], r["lang"], r["length"]): 100 * r["accuracy"] for r in runs}
    models = PAPER_MODELS + sorted({r["model"] for r in runs} - set(PAPER_MODELS))
    table1 = [[display_name(m)] + [_percent(acc) for key in (("cn", 256), ("en", 256))
                                   for acc in (ours.get((m, *key)), PAPER_ACCURACY[key].get(m))] for m in models]
    table2 = [[display_name(m), _percent(ours.get((m, "cn", 512))), _percent(PAPER_ACCURACY[("cn", 512)].get(m))]
              for m in models if m in PAPER_ACCURACY[("cn", 512)] or (m, "cn", 512) in ours]
    return "\n".join([
        "Table 1: exact recitation accuracy (%), prompt + poem <= 256 characters, after the runs' epochs "
        "(the paper: 100).", "",
        markdown_table(["Model", "CN (ours)", "CN (paper)", "ENG (ours)", "ENG (paper)"], table1), "",
        "Table 2: CN poems of 256-512 characters.", "",
        markdown_table(["Model", "CN 256-512 (ours)", "CN 256-512 (paper)"], table2)])


def cost_table(runs: list[dict]) -> str:
    body = []
    for r in runs:
        memorized = r["accuracy"] * r["n_poems"]
        per_poem = f"{run_gpu_seconds(r) / memorized:.2f}" if memorized else "-"
        body.append([Path(r["run_dir"]).name, display_name(r["model"]), f"{r['lang']}-{r['length']}", r["n_poems"],
                     r["epochs"], f"{100 * r['accuracy']:.2f}", _duration(r["train_seconds"]),
                     _duration(r["eval_seconds"]), f"{r.get('device', '?')} x{r.get('world_size', 1)}",
                     f"{run_gpu_seconds(r) / 3600:.3g}", per_poem])
    return markdown_table(["run", "model", "poems", "n", "epochs", "accuracy %", "train time", "eval time", "device",
                           "device-hours", "device-s per memorized poem"], body)


def _accuracy_figure(title: str, xlabel: str):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("exact recitation accuracy (%)")
    ax.set_ylim(0, 100)
    return fig, ax


def _save(fig, ax, path: Path) -> Path:
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def _label(run: dict) -> str:
    return f"{display_name(run['model'])} {run['lang']}-{run['length']}"


def plot_curves(runs: list[dict], path: Path) -> Path:
    """Memorization curves: exact-recitation accuracy per epoch of several runs in one figure."""
    fig, ax = _accuracy_figure("Memorization curves", "epoch")
    for r in runs:
        _, evals = epoch_curve(read_jsonl(Path(r["run_dir"]) / "metrics.jsonl"))
        ax.plot([m["epoch"] for m in evals], [100 * m["accuracy"] for m in evals], "o-", markersize=3, label=_label(r))
    return _save(fig, ax, path)


def accuracy_by_length(run: dict) -> list[dict]:
    """The evaluator's accuracy per bucket of poem characters: results.json's by_length, else
    recomputed from generations.jsonl."""
    from engine.evaluate import summarize
    return run.get("by_length") or summarize(read_jsonl(Path(run["run_dir"]) / "generations.jsonl"))["by_length"]


def plot_by_length(runs: list[dict], path: Path) -> Path:
    from engine.evaluate import LENGTH_EDGES, length_bucket
    labels = [length_bucket(edge) for edge in LENGTH_EDGES] + [length_bucket(LENGTH_EDGES[-1] + 1)]
    fig, ax = _accuracy_figure("Accuracy by poem length", "poem length (characters)")
    for r in runs:
        buckets = accuracy_by_length(r)
        ax.plot([labels.index(b["chars"]) for b in buckets], [100 * b["accuracy"] for b in buckets], "o-",
                label=_label(r))
    ax.set_xticks(range(len(labels)), labels)
    return _save(fig, ax, path)


def report(run_dirs: list[str], out=None) -> str:
    """report.md (the paper's tables beside ours, cost per run) with curves.png and accuracy_by_length.png
    in `out` (None: the runs' common parent folder). Returns the markdown."""
    runs = find_runs(run_dirs)
    if not runs:
        raise ValueError("report: no run folders given: pass the folders of finished memorize runs")
    out = Path(out) if out is not None else Path(os.path.commonpath([Path(r["run_dir"]).resolve() for r in runs]))
    if len(runs) == 1 and out == Path(runs[0]["run_dir"]).resolve():
        out = out.parent
    out.mkdir(parents=True, exist_ok=True)
    order = {m: i for i, m in enumerate(PAPER_MODELS)}
    runs.sort(key=lambda r: (order.get(r["model"], len(order)), r["model"], r["lang"], r["length"]))
    plot_curves(runs, out / "curves.png")
    plot_by_length(runs, out / "accuracy_by_length.png")
    text = "\n".join([
        "# Memorization: our runs beside the paper", "",
        "Paper: \"Schrödinger's Memory: Large Language Models\", Tables 1 and 2 (2,000 poems per set, 100 epochs).", "",
        accuracy_tables(runs), "",
        "## Cost per run", "",
        cost_table(runs), "",
        "![accuracy per epoch](curves.png)", "",
        "![accuracy by poem length](accuracy_by_length.png)", "",
        "Runs: " + ", ".join(r["run_dir"] for r in runs)]) + "\n"
    (out / "report.md").write_text(text, encoding="utf-8")
    return text
