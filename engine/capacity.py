"""Memorization capacity: how many poems, and how many bits per parameter, a model holds under the
paper's protocol, found by offering it more and more poems (issue #26).

    capacity(["tiny-qwen2-160k", "tiny-qwen2-360k"], [16, 32, 64, 128, 256])     # cli.py capacity

Size n trains on the first n poems of data/poems-cn-256-nested.jsonl.gz (one seeded shuffle of the
CN 256-bin pool, data/build_cn.py --nested), so each larger sample holds every smaller one and the
sizes differ only in what is added. Every size is one memorize run with the same settings; a seed
changes the preset's weights and the data order, not the poems. A finished run is reused when its
settings match and refused when they don't.

Per size: exact recitation with its 95% Wilson interval (seeds pooled), bits gained (the poems'
NLL under the base model minus under the trained one, engine/scoring.py), per parameter and per
memorized poem. The knee is the size at which the most poems are recited exactly (mean over
seeds): offering more poems past it recites fewer. Its bits gained are the capacity in bits; at
the largest size offered it is only a lower bound.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import sys
from pathlib import Path

from engine.data import FROZEN, encode_examples, load_poems
from engine.report import display_name, duration, markdown_table, pyplot, save_figure
from engine.runs import find_runs, is_run_folder, run_gpu_seconds, write_text
from engine.stats import spread, wilson_interval
from engine.train import TrainConfig, difference_text, differing_settings, memorize
from models import REGISTRY

NESTED = FROZEN / "poems-cn-256-nested.jsonl.gz"
NESTED_SHA1 = "3b52d4f6f39616290eb7c24693b92d0f89906e9b"
NESTED_POEMS = 16384
REFERENCE_BITS_PER_PARAMETER = (2.0, 3.6)     # Allen-Zhu & Li 3.3 (1,000 exposures); Morris et al. 2025 (saturated)
RECITED = 0.90                                # "still memorizes": at least this share recited exactly


# ---------------------------------------------------------------- the nested samples

def nested_lines(n: int) -> list[str]:
    """The first n lines of the shipped nested sample (its checksum checked)."""
    if not NESTED.is_file():
        raise FileNotFoundError(f"{NESTED} is missing: rebuild it with data/build_cn.py --nested {NESTED_POEMS} "
                                "(see data/README.md)")
    data = NESTED.read_bytes()
    if hashlib.sha1(data).hexdigest() != NESTED_SHA1:
        raise ValueError(f"{NESTED} does not have sha1 {NESTED_SHA1}: rebuild it with data/build_cn.py --nested "
                         f"{NESTED_POEMS}")
    return gzip.decompress(data).decode("utf-8").splitlines(keepends=True)[:n]


def sample_file(root, n: int, write: bool = True) -> Path:
    """root/poems/poems-n.jsonl, the nested sample of n poems as a memorize --source (written once)."""
    path = Path(root).resolve() / "poems" / f"poems-{n}.jsonl"
    if write and not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, "".join(nested_lines(n)))      # atomic: a killed write leaves no short sample behind
    return path


def parse_sizes(text: str) -> list[int]:
    """'16,32,64' -> [16, 32, 64]: distinct, ascending, each at most the shipped sample's."""
    try:
        sizes = [int(size) for size in text.split(",") if size.strip()]
    except ValueError:
        raise ValueError(f"--poems {text!r}: give comma-separated numbers of poems, e.g. 1000,2000,4000") from None
    if not sizes or any(size < 1 for size in sizes) or sizes != sorted(set(sizes)):
        raise ValueError(f"--poems {text!r}: give distinct ascending numbers of poems, each at least 1")
    if sizes[-1] > NESTED_POEMS:
        raise ValueError(f"--poems {sizes[-1]}: the nested sample holds {NESTED_POEMS} poems (rebuild it larger "
                         "with data/build_cn.py --nested)")
    return sizes


# ---------------------------------------------------------------- the runs

def run_folder(root, model: str, n: int, seed: int) -> Path:
    return Path(root) / Path(model).name / f"poems-{n}-seed{seed}"


def size_config(root, model: str, n: int, seed: int, **overrides) -> TrainConfig:
    """The memorize run of size n: the CN 256 protocol on the nested sample's first n poems."""
    return TrainConfig(model=model, lang="cn", length=256, poems=n, seed=seed, source=str(sample_file(root, n, False)),
                       out=str(run_folder(root, model, n, seed)), **overrides)


def differences(config: TrainConfig, saved: dict) -> list[str]:
    """The settings in which a finished run differs from `config` (its source compared by file name)."""
    found = [difference_text(*found) for found in differing_settings(config.resolved(), saved)]
    if Path(saved.get("source") or "").name != Path(config.source).name:
        found.append(f"--source {Path(config.source).name} (the run: {saved.get('source')})")
    return found


def check_models(models: list[str]) -> None:
    unknown = [model for model in models if not Path(model).is_dir() and model not in REGISTRY]
    if unknown or not models:
        raise ValueError(f"capacity: unknown model {', '.join(unknown) or '(none given)'}: not a folder and not one of "
                         f"{', '.join(REGISTRY)}")


def plan(models: list[str], sizes: list[int], seeds: list[int], root, **overrides) -> list[tuple[TrainConfig, bool]]:
    """(config, finished) per model x size x seed, every setting checked before anything trains;
    raises ValueError for a finished run trained with other settings."""
    check_models(models)
    configs, refused = [], []
    for model in models:
        for n in sizes:
            for seed in seeds:
                config = size_config(root, model, n, seed, **overrides)
                config.resolved()
                results = Path(config.out) / "results.json"
                finished = results.is_file()
                if finished and (found := differences(config, json.loads(results.read_text())["config"])):
                    refused.append(f"{config.out}: {'; '.join(found)}")
                config.resume = not finished and is_run_folder(config.out)
                configs.append((config, finished))
    if refused:
        raise ValueError("capacity: finished runs were trained with other settings (nothing was trained; move them "
                         "away or use their settings): " + " | ".join(refused))
    return configs


def capacity(models: list[str], sizes: list[int], seeds=(0,), root="runs/capacity", **overrides) -> dict:
    """Train what is missing (one memorize run per model x size x seed), then write the reports.
    overrides: TrainConfig fields shared by every run (epochs=, lr=, batch_tokens=, device=, ...)."""
    for config, finished in plan(models, sizes, list(seeds), root, **overrides):
        if finished:
            print(f"capacity: {config.out} is finished, reused", file=sys.stderr)
            continue
        print(f"capacity: training {config.model} on {config.poems} poems, seed {config.seed}", file=sys.stderr)
        sample_file(root, config.poems)
        memorize(config, progress=False)
    return write_reports(models, sizes, list(seeds), root)


# ---------------------------------------------------------------- the numbers

def size_row(n: int, runs: list[dict], flops: float) -> dict:
    """One size of one model: its seeds' runs pooled for recitation, their mean and spread for bits."""
    correct, total = sum(run["correct"] for run in runs), sum(run["n"] for run in runs)
    low, high = wilson_interval(correct, total)
    gained = spread([run["memorization"]["bits_gained"] for run in runs])
    memorized = spread([run["correct"] for run in runs])
    params = runs[0]["parameters"]
    return {"poems": n, "seeds": [run["config"]["seed"] for run in runs], "correct": correct, "n": total,
            "accuracy": correct / total, "interval": [low, high], "memorized_poems": memorized,
            "base_bits": spread([run["memorization"]["base_bits"] for run in runs])["mean"],
            "bits_gained": gained, "bits_per_parameter": gained["mean"] / params,
            "bits_per_memorized_poem": gained["mean"] / memorized["mean"] if memorized["mean"] else None,
            "flops": flops, "device_seconds": sum(run_gpu_seconds(run) for run in runs) / len(runs),
            "device": runs[0].get("device"), "run_dirs": [run["run_dir"] for run in runs]}


def estimate(rows: list[dict], parameters: int) -> dict:
    """The knee (the size reciting the most poems, mean over seeds; the first of ties) and the largest size
    still at >= RECITED exact recitation."""
    knee = max(rows, key=lambda row: (row["memorized_poems"]["mean"], -row["poems"]))
    recited = [row["poems"] for row in rows if row["accuracy"] >= RECITED]
    bits = knee["bits_gained"]["mean"]
    return {"knee_poems": knee["poems"], "knee_memorized_poems": knee["memorized_poems"]["mean"],
            "knee_bits": bits, "knee_bits_per_parameter": bits / parameters, "knee_reached": knee is not rows[-1],
            "max_bits_per_parameter": max(row["bits_per_parameter"] for row in rows),
            "largest_recited": max(recited) if recited else None}


def run_flops(model: str, run: dict) -> float:
    """Training FLOPs of a finished run (engine.costs' model over its poems' token lengths)."""
    from engine.costs import count_parameters, model_config, model_tokenizer, train_flops
    config = run["config"]
    poems = load_poems(config["lang"], config["length"], config["poems"], config["seed"], config["source"])
    lengths = [len(e) for e in encode_examples(poems, model_tokenizer(model)[0], config["lang"], config["format"])]
    shape = model_config(model)
    return train_flops(shape, count_parameters(shape), lengths) * config["epochs"]


def model_summary(model: str, sizes: list[int], seeds: list[int], root) -> dict:
    """capacity.json's content for one model, from its runs' results.json."""
    by_size = {n: find_runs([run_folder(root, model, n, seed) for seed in seeds]) for n in sizes}
    rows = [size_row(n, runs, run_flops(model, runs[0])) for n, runs in by_size.items()]
    first = by_size[sizes[0]][0]
    return {"model": model, "parameters": first["parameters"], "epochs": first["epochs"], "sizes": rows,
            **estimate(rows, first["parameters"]),
            "flops_total": sum(row["flops"] * len(row["seeds"]) for row in rows),
            "device_seconds_total": sum(row["device_seconds"] * len(row["seeds"]) for row in rows)}


# ---------------------------------------------------------------- the reports

def _spread_text(s: dict, spec: str = ",.0f") -> str:
    return format(s["mean"], spec) + (f" ± {format(s['std'], spec)}" if s["std"] is not None else "")


def size_table(summary: dict) -> str:
    body = [[row["poems"], f"{row['correct']}/{row['n']}", f"{100 * row['accuracy']:.1f}",
             f"[{100 * row['interval'][0]:.1f}, {100 * row['interval'][1]:.1f}]",
             _spread_text(row["memorized_poems"], ".1f"), f"{row['base_bits']:,.0f}", _spread_text(row["bits_gained"]),
             f"{row['bits_per_parameter']:.3f}", "-" if row["bits_per_memorized_poem"] is None
             else f"{row['bits_per_memorized_poem']:,.0f}", f"{row['flops'] / 1e12:.3g}",
             duration(row["device_seconds"])] for row in summary["sizes"]]
    return markdown_table(["poems offered", "recited (seeds pooled)", "exact %", "95% Wilson", "memorized poems",
                           "base bits", "bits gained", "bits/parameter", "bits per memorized poem", "TFLOP per run",
                           "device time per run"], body)


def estimate_text(summary: dict) -> str:
    largest = summary["largest_recited"]
    knee = (f"the knee: {summary['knee_memorized_poems']:.1f} poems recited exactly at {summary['knee_poems']} "
            f"offered, {summary['knee_bits']:,.0f} bits gained "
            f"({summary['knee_bits_per_parameter']:.3f} bits/parameter)")
    if not summary["knee_reached"]:
        knee += " - not reached: the largest size offered recites the most, so these are lower bounds"
    return "\n".join([
        f"- {knee}",
        f"- largest size still at >= {RECITED:.0%} exact recitation: "
        + (f"{largest} poems" if largest else f"none (every size below {RECITED:.0%})"),
        f"- most bits per parameter at any size: {summary['max_bits_per_parameter']:.3f} (references: "
        + " and ".join(f"{b:g}" for b in REFERENCE_BITS_PER_PARAMETER) + ")"])


def comparison_table(summaries: list[dict]) -> str:
    body = [[display_name(s["model"]), f"{s['parameters'] / 1e6:.3g}M", s["knee_poems"]
             if s["knee_reached"] else f">= {s['knee_poems']}", f"{s['knee_bits']:,.0f}",
             f"{s['knee_bits_per_parameter']:.3f}", f"{s['max_bits_per_parameter']:.3f}", s["largest_recited"] or "-",
             f"{s['flops_total'] / 1e12:.3g}", duration(s["device_seconds_total"])] for s in summaries]
    return markdown_table(["model", "parameters", "knee (poems)", "bits at the knee", "bits/parameter at the knee",
                           "max bits/parameter", f"largest size >= {RECITED:.0%}", "sweep TFLOP",
                           "sweep device time"], body)


def plot(summaries: list[dict], path: Path) -> Path:
    """Left: exact recitation against poems offered; right: bits gained, with each model's 2 and 3.6
    bits/parameter lines in its colour."""
    plt = pyplot()
    fig, (acc_ax, bits_ax) = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, s in enumerate(summaries):
        color, poems = f"C{i}", [row["poems"] for row in s["sizes"]]
        label = f"{display_name(s['model'])} ({s['parameters'] / 1e6:.2g}M)"
        errors = [[100 * (row["accuracy"] - row["interval"][0]) for row in s["sizes"]],
                  [100 * (row["interval"][1] - row["accuracy"]) for row in s["sizes"]]]
        acc_ax.errorbar(poems, [100 * row["accuracy"] for row in s["sizes"]], yerr=errors, color=color, marker="o",
                        capsize=3, label=label)
        bits_ax.plot(poems, [row["bits_gained"]["mean"] / 1000 for row in s["sizes"]], color=color, marker="o",
                     label=label)
        bits_ax.plot([s["knee_poems"]], [s["knee_bits"] / 1000], color=color, marker="*", markersize=16,
                     linestyle="none")
        for per_parameter, style in zip(REFERENCE_BITS_PER_PARAMETER, ("--", ":")):
            bits_ax.axhline(per_parameter * s["parameters"] / 1000, color=color, linestyle=style, linewidth=1,
                            label=f"{per_parameter:g} bits/parameter x {s['parameters'] / 1e6:.2g}M")
    acc_ax.axhline(100 * RECITED, color="grey", linestyle="--", linewidth=1, label=f"{RECITED:.0%}")
    acc_ax.set(xscale="log", ylim=(-2, 102), xlabel="poems offered", ylabel="exact recitation (%, 95% Wilson)",
               title="Exact recitation")
    bits_ax.set(xscale="log", ylim=(0, None), xlabel="poems offered", ylabel="bits gained (kbit)",
                title="Memorized bits (star: the knee, most poems recited)")
    for ax in (acc_ax, bits_ax):
        ax.set_xticks(poems, [str(n) for n in poems])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=8)
    return save_figure(fig, path, legend_ax=bits_ax)


def write_reports(models: list[str], sizes: list[int], seeds: list[int], root) -> dict:
    """root/MODEL/capacity.{md,json,png} per model and root/capacity.{md,json,png} across them."""
    summaries = [model_summary(model, sizes, seeds, root) for model in models]
    epochs = {s["epochs"] for s in summaries}
    intro = (f"Nested samples of CN 256-bin poems ({NESTED.name}, sha1 {NESTED_SHA1[:12]}), one memorize run per "
             f"size and seed ({', '.join(map(str, seeds))}), {'/'.join(map(str, sorted(epochs)))} epochs. Recitation: "
             "the seeds pooled; bits: mean ± sample std over the seeds. Device time: training, evaluations and "
             "scoring on the runs' device; TFLOP from engine/costs' training model.")
    for s in summaries:
        folder = Path(root) / Path(s["model"]).name
        write_text(folder / "capacity.json", json.dumps(s, indent=2))
        plot([s], folder / "capacity.png")
        write_text(folder / "capacity.md", "\n\n".join([
            f"# Memorization capacity of {display_name(s['model'])} ({s['parameters']:,} parameters)", intro,
            size_table(s), estimate_text(s), "![capacity](capacity.png)"]) + "\n")
    sections = [f"## {display_name(s['model'])}\n\n{size_table(s)}\n\n{estimate_text(s)}" for s in summaries]
    report = "\n\n".join(["# Memorization capacity across models", intro, comparison_table(summaries), *sections,
                          "![capacity](capacity.png)"]) + "\n"
    write_text(Path(root, "capacity.md"), report)
    write_text(Path(root, "capacity.json"), json.dumps(summaries, indent=2))
    plot(summaries, Path(root) / "capacity.png")
    return {"summaries": summaries, "report": report}


# ---------------------------------------------------------------- the projection

def projection(models: list[str], sizes: list[int], seeds=(0,), root="runs/capacity",
               epochs: int | None = None) -> tuple[list[dict], str]:
    """The GPU time of a capacity sweep, per model and size (engine.costs.profile on each nested sample)."""
    from engine.costs import profile
    check_models(models)
    epochs = epochs or TrainConfig.default("epochs")
    rows = []
    for model in models:
        for n in sizes:
            row = profile([model], "cn", 256, n, runs=[], epochs=epochs, source=sample_file(root, n), out=None)[0][0]
            rows.append({**row, "seeds": len(seeds), "sweep_gpu_hours": row["gpu_hours"] * len(seeds)})
    body = [[display_name(r["model"]), r["poems"], f"{r['tokens_per_epoch']:,}", f"{r['flops_total'] / 1e15:.3g}",
             f"{r['gpu_hours']:.2f}", r["tokenizer"], r["basis"]] for r in rows]
    totals = {model: sum(r["sweep_gpu_hours"] for r in rows if r["model"] == model) for model in models}
    text = "\n\n".join([
        f"Projected GPU time of a capacity sweep ({epochs} epochs, evaluation every "
        f"{TrainConfig.default('eval_every')}, {len(seeds)} seed(s) per size):",
        markdown_table(["model", "poems", "tokens/epoch", "PFLOP per run", "GPU-hours per run", "tokenizer", "basis"],
                       body),
        markdown_table(["model", "sweep GPU-hours"], [[display_name(m), f"{h:.1f}"] for m, h in totals.items()])])
    return rows, text
