"""What memorization costs per model size: FLOPs, memory, time and GPU-hours, and the profile table;
beside it the information view: bits gained per parameter, and FLOPs and GPU-seconds per memorized
poem and per kilobit gained, from finished runs (seeds pooled) or projected from the paper's accuracy.

    rows, table = profile(["qwen2-0.5b", "bloom-1b7"])      # cli.py profile

Cost model: a trained token costs 6N FLOPs (N: the parameters that take part in matmuls, the
tied output matrix once) plus causal attention 6·L·d·(s+1) per sequence of s tokens (12·L·d·ctx
per token with ctx the keys a token attends to, (s+1)/2 on average), d = heads x head_dim. Time
comes from a throughput benchmark of this device (bench/results/throughput-*.json) when one
exists, else it is projected on kernels.hardware.PROJECTION at ASSUMED_MFU and marked "projected".
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from engine.data import encode_examples, load_poems, model_format
from engine.distributed import RESHARD_ABOVE, blocks, step_traffic_bytes
from engine.report import (ACCURACY_LABEL, PAPER_ACCURACY, bits_per_parameter, cell, duration, markdown_table, pooled,
                           pyplot, save_figure, seed_groups)
from engine.runs import find_runs, run_gpu_seconds, write_text
from engine.train import TrainConfig
from kernels.hardware import PROJECTION
from kernels.linear_cross_entropy import chunk_plan
from models import PAPER_MODELS, REGISTRY, KVCache, ModelConfig, model_class, read_tokenizer_dir
from models.registry import TINY_TOKENIZER, cached_snapshot

# Well-tuned training stacks reach 33-56% of the bf16 peak (MFU); we assume the low middle.
ASSUMED_MFU = 0.40                 # training and prefill
ASSUMED_BANDWIDTH_USE = 0.60       # decode: share of HBM bandwidth reached reading weights + KV cache
EVAL_BATCH = 256                   # sequences decoded together in a recitation evaluation
PROJECTED = f"projected ({PROJECTION.name}, {ASSUMED_MFU:.0%} of {PROJECTION.peak_bf16_flops / 1e12:.0f} TFLOP/s)"
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
                            f"(hf download {spec.repo} config.json)")


def count_parameters(config: ModelConfig) -> int:
    """All parameters (a tied output matrix once), counted on the meta device: nothing is allocated."""
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
    chunk_plan: the logits chunk in the training dtype and its gradients, counted for every row: a bound).
    """
    h, q_dim, kv_dim = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    mlp = (3 if config.model_type == "qwen2" else 2) * config.intermediate_size
    per_token = config.num_layers * (4 * h + 2 * q_dim + 2 * kv_dim + mlp) + 2 * h
    head = chunk_plan(tokens, h, config.vocab_size, torch.bfloat16).peak_extra_bytes
    return BF16 * per_token * tokens + head


def memory_split(config: ModelConfig, parameters: int, micro_batch_tokens: int) -> dict:
    """Peak training memory on a GPU: bf16 weights; gradients in the fp32 accumulator (main_grad) plus
    the one bf16 .grad alive while a hook adds it in, at most the embedding's; fp32 master weights and
    two fp32 AdamW moments (engine/optim.py); activations of one micro-batch."""
    gradients = FP32 * parameters + BF16 * config.vocab_size * config.hidden_size
    parts = {"weights": BF16 * parameters, "gradients": gradients, "optimizer": 3 * FP32 * parameters,
             "activations": activation_bytes(config, micro_batch_tokens)}
    return {**parts, "total": sum(parts.values())}


# Usable memory of the cards (nvidia-smi's total), and the share of it a run's modeled peak may take: the
# rest is the CUDA context, the caching allocator's fragmentation and the communication buffers.
CARD_MIB = {"A100 40GB": 40960, "L40S 48GB": 46068, "A100 80GB": 81920, "H100 80GB": 81559, "H200 141GB": 143771}
PLAN_SHARE = 0.90
RANKS = (1, 2, 4, 8, 16, 32, 64)
SCALE_MODELS = ["qwen2.5-3b", "qwen2.5-7b"]    # beyond the paper: the ranks table goes up to them


def unit_parameters(config: ModelConfig, parameters: int) -> tuple[int, int]:
    """(one block's parameters, the root's: embedding, final norm, untied head), FSDP2's units."""
    with torch.device("meta"):
        model = model_class(config)(config)
    block = sum(p.numel() for p in blocks(model)[0].parameters())
    return block, parameters - config.num_layers * block


def memory_per_rank(config: ModelConfig, parameters: int, micro_batch_tokens: int, world: int) -> dict:
    """Peak training memory of one rank: memory_split for one process; under FSDP2 (engine/distributed.py)
    1/N of the fp32 weights (the masters), gradients and moments, the weights gathered in bf16 (all of
    them through the step up to RESHARD_ABOVE parameters; else two blocks in flight and the root), the
    largest unit's unsharded bf16 gradient and its fp32 copy for the reduce-scatter, and the activations
    of one micro-batch (each rank runs whole micro-batches)."""
    if world == 1:
        return memory_split(config, parameters, micro_batch_tokens)
    block, root = unit_parameters(config, parameters)
    gathered = parameters if parameters <= RESHARD_ABOVE else 2 * block + root
    parts = {"weights": FP32 * parameters / world + BF16 * gathered,
             "gradients": FP32 * parameters / world + (BF16 + FP32) * max(block, root),
             "optimizer": 2 * FP32 * parameters / world,
             "activations": activation_bytes(config, micro_batch_tokens)}
    return {**parts, "total": sum(parts.values())}


def smallest_world(config: ModelConfig, parameters: int, micro_batch_tokens: int, card_mib: int) -> int | None:
    """The fewest ranks (of RANKS) whose modeled peak per rank fits PLAN_SHARE of a card; None: none does."""
    budget = PLAN_SHARE * card_mib * 2 ** 20
    return next((n for n in RANKS if memory_per_rank(config, parameters, micro_batch_tokens, n)["total"] <= budget),
                None)


def ranks_table(models: list[str], micro_batch_tokens: int) -> str:
    """Per model: the modeled peak memory of a rank for 1..8 ranks, and the fewest ranks each card needs."""
    header = ["model", "params", *(f"{n} rank{'s' * (n > 1)} GiB" for n in RANKS[:4]), *(f"N on {card}" for card in CARD_MIB)]
    body = []
    for name in models:
        config = model_config(name)
        params = count_parameters(config)
        body.append([name, f"{params / 1e9:.2f}B",
                     *(_gib(memory_per_rank(config, params, micro_batch_tokens, n)["total"]) for n in RANKS[:4]),
                     *(str(smallest_world(config, params, micro_batch_tokens, mib) or f">{RANKS[-1]}")
                       for mib in CARD_MIB.values())])
    notes = [f"Memory per rank (a model, not a measurement) at micro-batches of {micro_batch_tokens} tokens: one "
             "process as above; N ranks under FSDP2 hold 1/N of the fp32 weights, gradients and moments (16 bytes a "
             f"parameter in all), the bf16 weights gathered (all of them through the step up to "
             f"{RESHARD_ABOVE / 1e9:.0f}B parameters, else two blocks and the root), one unit's unsharded gradient, "
             f"and one micro-batch's activations. N on a card: the fewest ranks whose peak fits {PLAN_SHARE:.0%} of "
             "it; fewer --micro-batch-tokens lower the activations (gradient accumulation keeps the step).",
             "Communication per step and micro-batch, each rank: (N-1)/N x (2 bytes gathered + 4 reduce-scattered) "
             f"a parameter (engine.distributed.step_traffic_bytes): {step_traffic_bytes(1000, 2) / 1000:g} bytes a "
             f"parameter on 2 ranks ({step_traffic_bytes(count_parameters(model_config('qwen2-0.5b')), 2) / 1e9:.1f} "
             f"GB a step for qwen2-0.5b), {step_traffic_bytes(1000, 8) / 1000:g} on 8; FSDP2 overlaps it with the "
             "blocks' compute."]
    return markdown_table(header, body) + "\n\n" + "\n".join(notes)


def projected_eval_seconds(config: ModelConfig, parameters: int, prompt_tokens: list[int],
                           target_tokens: list[int]) -> float:
    """One recitation evaluation on the projection's GPU: prefill at ASSUMED_MFU, then decode steps of EVAL_BATCH
    sequences, each reading the bf16 weights and the batch's KV cache at ASSUMED_BANDWIDTH_USE."""
    prefill = 2 * matmul_parameters(config, parameters) * sum(prompt_tokens) / (PROJECTION.peak_bf16_flops * ASSUMED_MFU)
    mean_context = (sum(prompt_tokens) + sum(target_tokens) / 2) / len(target_tokens)
    step_bytes = BF16 * parameters + EVAL_BATCH * mean_context * KVCache.bytes_per_token(config, torch.bfloat16)
    steps = sum(target_tokens) / EVAL_BATCH
    return prefill + steps * step_bytes / (PROJECTION.hbm_bytes_per_second * ASSUMED_BANDWIDTH_USE)


# ---------------------------------------------------------------- inputs: tokens and benchmarks

def model_tokenizer(name: str):
    """(tokenizer, note): the model's own when its files are local (a preset's own is the tiny one), else the
    tiny tokenizer as a proxy."""
    spec = REGISTRY.get(name)
    directory = Path(name) if Path(name).is_dir() else (cached_snapshot(spec.repo) if spec and spec.repo else None)
    if directory is not None and (directory / "tokenizer.json").is_file():
        return read_tokenizer_dir(directory), "own"
    return read_tokenizer_dir(TINY_TOKENIZER), "own" if spec is not None and spec.repo is None else "tiny proxy"


def this_device() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def load_bench(bench_dir) -> dict | None:
    """The throughput benchmark (bench/throughput.py's JSON) recorded on this device, if any."""
    for path in sorted(Path(bench_dir).glob("throughput-*.json")):
        bench = json.loads(path.read_text()) if not path.name.endswith("-detail.json") else {}
        if bench.get("device") == this_device() and "models" in bench:
            return {**bench, "path": str(path)}
    return None


# ---------------------------------------------------------------- profile

def profile(models: list[str] | None = None, lang: str = "cn", length: int = 256,
            n_poems: int = TrainConfig.default("poems"), bench_dir="bench/results", runs=None,
            epochs: int = TrainConfig.default("epochs"), eval_every: int = TrainConfig.default("eval_every"),
            micro_batch_tokens: int = TrainConfig.default("batch_tokens"), source=None, seed: int = 0,
            out="runs/profile") -> tuple[list[dict], str]:
    """Per model: parameters, tokens, FLOPs, time and GPU-hours of the `epochs`-epoch experiment,
    peak memory by part, and accuracy and cost per memorized poem of matching finished runs.
    Writes profile.json and profile.png into `out` (None: nothing written)."""
    models = models or PAPER_MODELS
    poems = load_poems(lang, length, n_poems, seed, source)
    bench = load_bench(bench_dir)
    finished = seed_groups(find_runs(runs))
    encoded, rows = {}, []
    for name in models:
        config = model_config(name)
        params = count_parameters(config)
        tokenizer, tokenizer_note = model_tokenizer(name)
        fmt = model_format(name, tokenizer)
        key = (str(tokenizer.source_dir), fmt)
        if key not in encoded:
            encoded[key] = encode_examples(poems, tokenizer, lang, fmt)
        examples = encoded[key]
        lengths = [len(example) for example in examples]
        flops = train_flops(config, params, lengths)
        measured = (bench or {}).get("models", {}).get(name)
        measured = measured if measured and "train_tokens_per_second" in measured else None
        epoch_s, eval_s, basis = seconds_per_epoch_and_eval(config, params, examples, flops, measured, bench)
        row = {"model": name, "parameters": params, "tokenizer": tokenizer_note, "format": fmt, "poems": len(examples),
               "tokens_per_epoch": sum(lengths), "flops_per_epoch": flops, "flops_total": flops * epochs,
               "epoch_seconds": epoch_s, "eval_seconds": eval_s,
               "gpu_hours": (epochs * epoch_s + math.ceil(epochs / eval_every) * eval_s) / 3600, "basis": basis,
               "projected": not measured, "memory": memory_split(config, params, micro_batch_tokens),
               "measured_peak_memory_bytes": measured.get("peak_memory_bytes") if measured else None,
               "paper_accuracy": PAPER_ACCURACY.get((lang, length), {}).get(name)}

        def run_flops(run, config=config, params=params, tokenizer=tokenizer, fmt=fmt):
            run_poems = load_poems(lang, length, run["n_poems"], run["config"]["seed"], run["config"].get("source"))
            lengths = [len(example) for example in encode_examples(run_poems, tokenizer, lang, fmt)]
            return train_flops(config, params, lengths) * run["epochs"]
        row.update(information_view(row, finished.get((name, lang, length), []), run_flops))
        rows.append(row)
    table = "\n\n".join([profile_table(rows, lang, length, epochs, eval_every, micro_batch_tokens), information_table(rows),
                          ranks_table(models + [name for name in SCALE_MODELS if name not in models], micro_batch_tokens)])
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_text(Path(out) / "profile.json", json.dumps(rows, indent=2))
        plot_profile(rows, Path(out) / "profile.png", f"{lang}-{length}, {epochs} epochs")
    return rows, table


def information_view(row: dict, runs: list[dict], run_flops) -> dict:
    """Accuracy, bits per parameter and the cost per memorized poem and per kilobit gained of a model's
    finished runs (seeds pooled; run_flops(run): its training FLOPs), or without one the cost per poem
    projected from the paper's accuracy (bits need a run)."""
    if not runs:
        memorized = (row["paper_accuracy"] or 0) / 100 * row["poems"]
        return {"cost_basis": "projected from the paper's accuracy" if memorized else None,
                "flops_per_poem": row["flops_total"] / memorized if memorized else None,
                "gpu_seconds_per_poem": row["gpu_hours"] * 3600 / memorized if memorized else None}
    memorized, n = pooled(runs)
    flops, seconds = sum(run_flops(run) for run in runs), sum(run_gpu_seconds(run) for run in runs)
    scored = [run["memorization"] for run in runs if "memorization" in run]
    kbit = sum(bits["bits_gained"] for bits in scored) / 1000 if len(scored) == len(runs) else None
    per = lambda total, count: total / count if count and count > 0 else None       # noqa: E731
    per_param = bits_per_parameter(runs)
    return {"accuracy": 100 * memorized / n, "run_dir": ", ".join(run["run_dir"] for run in runs),
            "run_poems": runs[0]["n_poems"], "run_epochs": runs[0]["epochs"], "seeds": len(runs),
            "cost_basis": "measured (finished runs)", "kbit_gained": kbit,
            "bits_per_parameter": per(sum(per_param), len(per_param)),
            "flops_per_poem": per(flops, memorized), "gpu_seconds_per_poem": per(seconds, memorized),
            "flops_per_kbit": per(flops, kbit), "gpu_seconds_per_kbit": per(seconds, kbit)}


def information_table(rows: list[dict]) -> str:
    body = [[row["model"], cell(row.get("accuracy"), ".4g"), cell(row["paper_accuracy"], ".4g"),
             cell(row.get("kbit_gained")), cell(row.get("bits_per_parameter")),
             cell(row.get("flops_per_poem"), scale=1e12), cell(row.get("gpu_seconds_per_poem")),
             cell(row.get("flops_per_kbit"), scale=1e12), cell(row.get("gpu_seconds_per_kbit")),
             row.get("cost_basis") or "-"] for row in rows]
    header = ["model", "acc % (ours)", "acc % (paper)", "kbit gained", "bits/parameter", "TFLOP per memorized poem",
              "GPU-s per memorized poem", "TFLOP per kbit gained", "GPU-s per kbit gained", "basis"]
    return ("Information view: bits gained = the training poems' NLL under the base model minus under the trained "
            "one (engine/scoring.py); training FLOPs and device-seconds (training, evaluation, scoring) divided by "
            "the poems recited exactly and by the kilobits gained. Without a finished run the cost per poem is "
            "projected from the paper's accuracy and the projected time above.\n\n" + markdown_table(header, body))


def seconds_per_epoch_and_eval(config, params, examples, flops, measured: dict | None, bench: dict | None):
    """(training seconds per epoch, seconds per evaluation, basis): from this device's benchmark of the
    model when there is one, else projected (PROJECTION)."""
    prompt_tokens = [len(example.prompt_ids) for example in examples]
    target_tokens = [len(example.target_ids) for example in examples]
    if measured:
        return (sum(prompt_tokens + target_tokens) / measured["train_tokens_per_second"],
                sum(target_tokens) / measured["eval_tokens_per_second"], f"measured ({bench['device']})")
    return (flops / (PROJECTION.peak_bf16_flops * ASSUMED_MFU),
            projected_eval_seconds(config, params, prompt_tokens, target_tokens), PROJECTED)


def _gib(n) -> str:
    return f"{n / 2**30:.1f}"


def profile_table(rows: list[dict], lang: str, length: int, epochs: int, eval_every: int, micro_batch_tokens: int) -> str:
    body = []
    for row in rows:
        memory, measured_peak = row["memory"], row["measured_peak_memory_bytes"]
        body.append([row["model"], f"{row['parameters'] / 1e6:,.0f}M",
                     f"{row['tokens_per_epoch']:,}" + (" *" if row["tokenizer"] != "own" else ""),
                     f"{row['flops_per_epoch'] / 1e15:.2f}", f"{row['flops_total'] / 1e18:.2f}",
                     duration(row["epoch_seconds"]), f"{row['gpu_hours']:.3g}" + ("" if row["projected"] else " (measured)"),
                     *(_gib(memory[part]) for part in ("weights", "gradients", "optimizer", "activations")),
                     _gib(memory["total"]) + (f" ({_gib(measured_peak)} measured)" if measured_peak else ""),
                     f"{row['accuracy']:.2f}" if "accuracy" in row else "-",
                     "-" if row["paper_accuracy"] is None else row["paper_accuracy"]])
    header = ["model", "params", "tokens/epoch", "PFLOP/epoch", f"EFLOP/{epochs} ep", "time/epoch",
              f"GPU-h ({epochs} ep + eval)", "weights GiB", "grads GiB", "AdamW GiB",
              f"activ. GiB ({micro_batch_tokens} tok)", "peak GiB", "acc % (ours)", "acc % (paper)"]
    notes = [f"Cost of memorizing {rows[0]['poems'] if rows else 0} {lang}-{length} poems for {epochs} epochs.",
             "Time: " + "; ".join(sorted({row["basis"] for row in rows})) + ". Projected evaluation: decode at "
             f"{ASSUMED_BANDWIDTH_USE:.0%} of {PROJECTION.hbm_bytes_per_second / 1e12:.2f} TB/s, batch {EVAL_BATCH}, "
             f"one evaluation every {eval_every} epochs.",
             "FLOPs: 6N + causal attention 6·L·d·(s+1) per sequence of s tokens. Memory: bf16 weights, fp32 "
             "gradient accumulator (+ one bf16 tensor's gradient in flight), fp32 master + 2 moments, activations of "
             "one packed micro-batch (no recompute)."]
    notes += [f"Ours: {row['run_dir']} ({row['run_poems']} poems, {row['run_epochs']} epochs)."
              for row in rows if "run_dir" in row]
    if any(row["tokenizer"] != "own" for row in rows):
        notes.append("* tokens counted with the tiny tokenizer as a proxy: the model's tokenizer is not available "
                     "locally (real counts differ).")
    return markdown_table(header, body) + "\n\n" + "\n".join(notes)


def plot_profile(rows: list[dict], path: Path, title: str) -> Path:
    """Model size vs GPU-hours (left) and exact-recitation accuracy, ours and the paper's (right)."""
    rows = sorted(rows, key=lambda row: row["parameters"])
    fig, cost_ax = pyplot().subplots(figsize=(8, 4.5))
    sizes = [row["parameters"] / 1e6 for row in rows]
    cost_ax.plot(sizes, [row["gpu_hours"] for row in rows], "s-", color="tab:blue")
    for x, row in zip(sizes, rows):
        cost_ax.annotate(row["model"], (x, row["gpu_hours"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    cost_ax.set(title=f"Cost of memorization by model size ({title})", xscale="log", xlabel="parameters (millions)")
    cost_ax.set_ylabel("GPU-hours, training + evaluation", color="tab:blue")
    acc_ax = cost_ax.twinx()
    for key, marker, label in (("accuracy", "o", "ours"), ("paper_accuracy", "^", "paper")):
        points = [(x, row[key]) for x, row in zip(sizes, rows) if row.get(key) is not None]
        if points:
            acc_ax.scatter(*zip(*points), marker=marker, color="tab:red", label=f"accuracy ({label})",
                           facecolors="none" if label == "paper" else "tab:red")
    acc_ax.set_ylim(0, 100)
    acc_ax.set_ylabel(ACCURACY_LABEL, color="tab:red")
    if acc_ax.get_legend_handles_labels()[0]:
        acc_ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)
