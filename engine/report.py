"""Everything rendered for a reader: a run's report (results.json, generations.jsonl, a plot of
loss and recitation accuracy per epoch, report.md), the data statistics of `cli.py data`, and the
paper's Tables 1 and 2 beside our runs (`cli.py report`).

    write_run_report(out, results, records)        # memorize, at the end of a run
    print(describe("cn", 256, tokenizer, 8192))   # cli.py data
    markdown = report(["runs/sweep/qwen2-0.5b-cn-256"])      # cli.py report
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from engine.data import FROZEN, default_format, encode_examples, load_poems, poem_chars
from engine.evaluate import LENGTH_EDGES, length_bucket, summarize, write_results
from engine.packing import pack, packing_efficiency
from engine.runs import find_runs, read_jsonl, run_gpu_seconds
from models import PAPER_MODELS, REGISTRY

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


# ---------------------------------------------------------------- one run's report

def epoch_curve(metrics: list[dict]) -> tuple[list[dict], list[dict]]:
    """(per-epoch loss records, per-epoch accuracy records) from metrics.jsonl."""
    epochs = [m for m in metrics if "epoch_loss" in m]
    return epochs, [m for m in epochs if "accuracy" in m]


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def plot_run(out: Path, title: str) -> Path:
    plt = pyplot()
    epochs, evals = epoch_curve(read_jsonl(out / "metrics.jsonl"))
    fig, loss_ax = plt.subplots(figsize=(7, 4))
    loss_ax.plot([m["epoch"] for m in epochs], [m["epoch_loss"] for m in epochs], color="tab:blue", label="loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("training loss (mean CE per target token)", color="tab:blue")
    loss_ax.set_yscale("log")
    acc_ax = loss_ax.twinx()
    acc_ax.plot([m["epoch"] for m in evals], [100 * m["accuracy"] for m in evals], "o-", color="tab:red")
    acc_ax.set_ylabel("exact recitation accuracy (%)", color="tab:red")
    acc_ax.set_ylim(0, 100)
    loss_ax.set_title(title)
    return save_figure(fig, out / "curve.png")


def write_run_report(out: Path, results: dict, records: list[dict]) -> None:
    out = Path(out)
    write_results(out, results, records)
    title = f"{results['model']} {results['lang']}-{results['length']}: {results['n_poems']} poems"
    plot_run(out, title)
    categories = results.get("categories", {})
    lines = [
        f"# {title}",
        "",
        f"- exact recitation accuracy: **{100 * results['accuracy']:.2f}%** after {results['epochs']} epochs",
        "- errors: " + ", ".join(f"{name} {count}" for name, count in categories.items()),
        f"- trained tokens: {results['train_tokens']:,} in {results['train_seconds']:.1f} s "
        f"({results['tokens_per_second']:,.0f} tokens/s) on {results['device']}; evaluation {results['eval_seconds']:.1f} s",
        f"- peak memory: {results['peak_memory_bytes'] / 2**30:.2f} GiB; parameters: {results['parameters']:,}",
        "",
        "![loss and accuracy per epoch](curve.png)",
        "",
        "Files: results.json (all numbers and the full config), metrics.jsonl (per step and per epoch),",
        "generations.jsonl (prompt, target, output, correct per poem), model/ (the final weights, Hugging Face format).",
    ]
    wrong = [record for record in records if not record.get("correct")][:3]
    if wrong:
        lines += ["", "## Some wrong recitations", ""]
        for record in wrong:
            lines += [f"- {record['prompt']}", f"  - target: {record['target']!r}", f"  - output: {record['output']!r}"]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- tables

def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


# ---------------------------------------------------------------- `cli.py data`

def histogram(values: list[int], bins: int = 8, width: int = 40) -> str:
    lo, hi = min(values), max(values)
    step = max(1, -(-(hi - lo + 1) // bins))
    counts = Counter((v - lo) // step for v in values)
    top = max(counts.values())
    return "\n".join(f"  {lo + b * step:>6}-{lo + (b + 1) * step - 1:<6} {counts[b]:>5} {'#' * round(width * counts[b] / top)}"
                     for b in range(-(-(hi - lo + 1) // step)))


def describe(lang: str, length: int, tokenizer, budget_tokens: int, source=None, n: int | None = 2000,
             seed: int = 0, fmt: str | None = None) -> str:
    """The report of `cli.py data`: counts, character and token histograms, packing efficiency."""
    fmt = fmt or default_format(tokenizer)
    poems = load_poems(lang, length, n, seed, source)
    examples = encode_examples(poems, tokenizer, lang, fmt, budget_tokens)
    chars = [poem_chars(poem, lang) for poem in poems]
    tokens = [len(example) for example in examples]
    batches = pack(examples, budget_tokens, seed=seed, epoch=0)
    where = source or FROZEN / f"poems-{lang}-{length}.jsonl"
    total, fullest = sum(tokens), sorted(batch.num_tokens for batch in batches)[1:]
    return "\n".join([
        f"{len(poems)} {lang} poems from {where} (length bin {length}, seed {seed}, format {fmt})",
        f"characters (prompt + poem): min {min(chars)} mean {sum(chars) / len(chars):.1f} max {max(chars)}",
        histogram(chars),
        f"tokens (prompt + target + EOS): min {min(tokens)} mean {total / len(tokens):.1f} max {max(tokens)}, "
        f"total {total} ({sum(len(example.target_ids) for example in examples)} target)",
        histogram(tokens),
        f"packing at {budget_tokens} tokens per batch: {len(batches)} batches, "
        f"efficiency {100 * packing_efficiency(batches, budget_tokens):.2f}% "
        f"(at most {100 * total / (-(-total // budget_tokens) * budget_tokens):.2f}% for {total} tokens"
        + (f"; the {len(fullest)} fullest batches are {100 * sum(fullest) / (len(fullest) * budget_tokens):.2f}% full)"
           if fullest else ")"),
    ])


# ---------------------------------------------------------------- the paper's tables beside our runs

def display_name(model: str) -> str:
    """The paper's name for a registry model (its hub repository's name)."""
    spec = REGISTRY.get(model)
    return spec.repo.split("/")[-1] if spec and spec.repo else Path(model).name


def _percent(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def accuracy_tables(runs: list[dict]) -> str:
    """Our accuracy beside the paper's, in the layout of its Table 1 (CN / ENG) and Table 2 (CN 256-512)."""
    ours = {(run["model"], run["lang"], run["length"]): 100 * run["accuracy"] for run in runs}
    models = PAPER_MODELS + sorted({run["model"] for run in runs} - set(PAPER_MODELS))
    table1 = [[display_name(model)] + [_percent(accuracy) for key in (("cn", 256), ("en", 256))
                                       for accuracy in (ours.get((model, *key)), PAPER_ACCURACY[key].get(model))]
              for model in models]
    table2 = [[display_name(model), _percent(ours.get((model, "cn", 512))),
               _percent(PAPER_ACCURACY[("cn", 512)].get(model))]
              for model in models if model in PAPER_ACCURACY[("cn", 512)] or (model, "cn", 512) in ours]
    return "\n".join([
        "Table 1: exact recitation accuracy (%), prompt + poem <= 256 characters, after the runs' epochs "
        "(the paper: 100).", "",
        markdown_table(["Model", "CN (ours)", "CN (paper)", "ENG (ours)", "ENG (paper)"], table1), "",
        "Table 2: CN poems of 256-512 characters.", "",
        markdown_table(["Model", "CN 256-512 (ours)", "CN 256-512 (paper)"], table2)])


def cost_table(runs: list[dict]) -> str:
    body = []
    for run in runs:
        memorized = run["accuracy"] * run["n_poems"]
        per_poem = f"{run_gpu_seconds(run) / memorized:.2f}" if memorized else "-"
        body.append([Path(run["run_dir"]).name, display_name(run["model"]), f"{run['lang']}-{run['length']}", run["n_poems"],
                     run["epochs"], f"{100 * run['accuracy']:.2f}", duration(run["train_seconds"]),
                     duration(run["eval_seconds"]), f"{run.get('device', '?')} x{run.get('world_size', 1)}",
                     f"{run_gpu_seconds(run) / 3600:.3g}", per_poem])
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
    return save_figure(fig, path)


def _label(run: dict) -> str:
    return f"{display_name(run['model'])} {run['lang']}-{run['length']}"


def plot_curves(runs: list[dict], path: Path) -> Path:
    """Memorization curves: exact-recitation accuracy per epoch of several runs in one figure."""
    fig, ax = _accuracy_figure("Memorization curves", "epoch")
    for run in runs:
        _, evals = epoch_curve(read_jsonl(Path(run["run_dir"]) / "metrics.jsonl"))
        ax.plot([m["epoch"] for m in evals], [100 * m["accuracy"] for m in evals], "o-", markersize=3, label=_label(run))
    return _save(fig, ax, path)


def accuracy_by_length(run: dict) -> list[dict]:
    """The evaluator's accuracy per bucket of poem characters: results.json's by_length, else
    recomputed from generations.jsonl."""
    return run.get("by_length") or summarize(read_jsonl(Path(run["run_dir"]) / "generations.jsonl"))["by_length"]


def plot_by_length(runs: list[dict], path: Path) -> Path:
    labels = [length_bucket(edge) for edge in LENGTH_EDGES] + [length_bucket(LENGTH_EDGES[-1] + 1)]
    fig, ax = _accuracy_figure("Accuracy by poem length", "poem length (characters)")
    for run in runs:
        buckets = accuracy_by_length(run)
        ax.plot([labels.index(b["chars"]) for b in buckets], [100 * b["accuracy"] for b in buckets], "o-",
                label=_label(run))
    ax.set_xticks(range(len(labels)), labels)
    return _save(fig, ax, path)


def report(run_dirs: list[str], out=None) -> str:
    """report.md (the paper's tables beside ours, cost per run) with curves.png and accuracy_by_length.png
    in `out` (None: the runs' common parent folder). Returns the markdown."""
    runs = find_runs(run_dirs)
    if not runs:
        raise ValueError("report: no run folders given: pass the folders of finished memorize runs")
    out = Path(out) if out is not None else Path(os.path.commonpath([Path(run["run_dir"]).resolve() for run in runs]))
    if len(runs) == 1 and out == Path(runs[0]["run_dir"]).resolve():
        out = out.parent
    out.mkdir(parents=True, exist_ok=True)
    order = {model: i for i, model in enumerate(PAPER_MODELS)}
    runs.sort(key=lambda run: (order.get(run["model"], len(order)), run["model"], run["lang"], run["length"]))
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
        "Runs: " + ", ".join(run["run_dir"] for run in runs)]) + "\n"
    (out / "report.md").write_text(text, encoding="utf-8")
    return text
