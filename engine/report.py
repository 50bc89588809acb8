"""Everything rendered for a reader: a run's report (results.json, generations.jsonl, report.md with
curve.png, loss and accuracy per epoch, and the memorization view from evals.jsonl: bits.png,
accuracy_by_length_curve.png, first_recited.png), the data statistics of `cli.py data`, and the
paper's Tables 1 and 2 beside our runs, with the spread across seeds and the memorization-ability
ranking (`cli.py report`).

    write_run_report(out, results, records)        # memorize, at the end of a run
    print(describe("cn", 256, tokenizer, 8192))   # cli.py data
    markdown = report(["runs/sweep/qwen2-0.5b-cn-256"])      # cli.py report
"""
from __future__ import annotations

import os
from collections import Counter
from itertools import accumulate
from pathlib import Path

from engine import dynamics
from engine.data import FROZEN, default_format, encode_examples, load_poems, poem_chars
from engine.evaluate import LENGTH_EDGES, length_bucket, summarize, write_results
from engine.packing import pack, packing_efficiency
from engine.runs import find_runs, is_run_folder, read_jsonl, run_gpu_seconds, write_text
from engine.stats import inside, rank_by_accuracy, spread, wilson_interval
from models import PAPER_MODELS, REGISTRY
from models.weights import atomic_write

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

PERCENT_LIMITS = (-2, 102)      # 0% and 100% lines stay visible inside the frame
ACCURACY_LABEL = "exact recitation accuracy (%)"


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


def save_figure(fig, path: Path, legend_ax=None) -> Path:
    """Writes the figure (with legend_ax's legend in small print, if given) atomically and closes it."""
    if legend_ax is not None:
        legend_ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format=Path(path).suffix[1:]))
    pyplot().close(fig)
    return path


def plot_run(out: Path, title: str) -> Path:
    epochs, evals = epoch_curve(read_jsonl(out / "metrics.jsonl"))
    fig, loss_ax = pyplot().subplots(figsize=(7, 4))
    loss_ax.plot([m["epoch"] for m in epochs], [m["epoch_loss"] for m in epochs], color="tab:blue", label="loss")
    loss_ax.set(title=title, xlabel="epoch", yscale="log")
    loss_ax.set_ylabel("training loss (mean CE per target token)", color="tab:blue")
    acc_ax = loss_ax.twinx()
    acc_ax.plot([m["epoch"] for m in evals], [100 * m["accuracy"] for m in evals], "o-", color="tab:red")
    acc_ax.set_ylabel(ACCURACY_LABEL, color="tab:red")
    acc_ax.set_ylim(0, 100)
    return save_figure(fig, out / "curve.png")


def provenance_section(found: dict) -> list[str]:
    """What produced the run: report.md's lines of results.json's provenance."""
    engine, model = found["engine"], found["model"]
    commit = "not a git checkout" if engine["commit"] is None else \
        engine["commit"][:12] + (" (with uncommitted changes)" if engine["dirty"] else "")
    weights = model["path"] or f"{model['name']} (random init, seeded)"
    if model["hub_id"]:
        weights += f" = {model['hub_id']}" + (f" @ {model['revision'][:12]}" if model["revision"] else "")
    digests = ", ".join(f"{name} {digest[:12]}" for name, digest in (model["weights_sha256"] or {}).items())
    versions = ", ".join(f"{name} {version}" for name, version in found["versions"].items() if version)
    return ["## Provenance", "",
            f"- command: `{found['command']}`",
            f"- engine: {commit}; {versions}",
            f"- weights: {weights}" + (f" (sha256 {digests})" if digests else ""),
            f"- poems: sha256 {found['poems_sha256'][:16]}",
            f"- {found['started']} to {found['ended']}" + (" (resumed)" if found.get("resumed") else "") +
            f" on {found['host']}, {found['device']}"]


def write_run_report(out: Path, results: dict, records: list[dict]) -> None:
    out = Path(out)
    write_results(out, results, records)
    title = f"{results['model']} {results['lang']}-{results['length']}: {results['n_poems']} poems"
    plot_run(out, title)
    lines = [
        f"# {title}",
        "",
        f"- exact recitation accuracy: **{100 * results['accuracy']:.2f}%** after {results['epochs']} epochs",
        "- errors: " + ", ".join(f"{name} {count}" for name, count in results.get("categories", {}).items()),
        f"- trained tokens: {results['train_tokens']:,} in {results['train_seconds']:.1f} s "
        f"({results['tokens_per_second']:,.0f} tokens/s) on {results['device']}; evaluation {results['eval_seconds']:.1f} s",
        f"- peak memory: {results['peak_memory_bytes'] / 2**30:.2f} GiB; parameters: {results['parameters']:,}",
        "",
        "![loss and accuracy per epoch](curve.png)",
        "",
    ]
    if (out / dynamics.EVALS_FILE).is_file() and "memorization" in results:
        write_run_plots(out, read_jsonl(out / "metrics.jsonl"), read_jsonl(out / dynamics.EVALS_FILE), title)
        lines += memorization_section(results) + [""]
    if "provenance" in results:
        lines += provenance_section(results["provenance"]) + [""]
    lines += [
        "Files: results.json (all numbers and the full config), metrics.jsonl (per step and per epoch),",
        "generations.jsonl (prompt, target, output, correct, bits per poem), evals.jsonl (each poem at each",
        "evaluation), model/ (the final weights, Hugging Face format).",
    ]
    wrong = [record for record in records if not record.get("correct")][:3]
    if wrong:
        lines += ["", "## Some wrong recitations", ""]
        for record in wrong:
            lines += [f"- {record['prompt']}", f"  - target: {record['target']!r}", f"  - output: {record['output']!r}"]
    write_text(out / "report.md", "\n".join(lines) + "\n")


def percent_figure(title: str, xlabel: str, ylabel: str = ACCURACY_LABEL):
    """A figure with one axis of percentages (the accuracy plots of a run and of a report)."""
    fig, ax = pyplot().subplots(figsize=(7, 4))
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, ylim=PERCENT_LIMITS)
    return fig, ax


def plot_bits_and_accuracy(path: Path, bits_curve: list[dict], accuracy_curve: list[dict], title: str) -> Path:
    """The training poems' bits at each evaluation (epoch 0: the base model, the data's information) beside
    the accuracy with its 95% Wilson band.
    bits_curve: [{"epoch", "bits"}] (epoch 0 = base model); accuracy_curve: [{"epoch", "n", "correct"}]."""
    fig, (bits_ax, acc_ax) = pyplot().subplots(1, 2, figsize=(11, 4))
    bits_ax.plot([m["epoch"] for m in bits_curve], [m["bits"] / 1000 for m in bits_curve], "o-", color="tab:purple")
    if bits_curve and bits_curve[0]["epoch"] == 0:
        base = bits_curve[0]["bits"] / 1000
        bits_ax.axhline(base, ls="--", color="gray", lw=1)
        bits_ax.annotate(f"base model: {base:,.1f} kbit", (0, base), textcoords="offset points", xytext=(8, -14),
                         color="gray", fontsize=8)
    bits_ax.set(title="information left to learn", xlabel="epoch", ylabel="NLL of the training poems' targets (kbit)",
                ylim=(0, None))
    epochs = [m["epoch"] for m in accuracy_curve]
    bands = [wilson_interval(m["correct"], m["n"]) for m in accuracy_curve]
    acc_ax.fill_between(epochs, [100 * lo for lo, _ in bands], [100 * hi for _, hi in bands], color="tab:red",
                        alpha=0.2, lw=0, label="95% Wilson interval")
    acc_ax.plot(epochs, [100 * m["correct"] / m["n"] for m in accuracy_curve], "o-", color="tab:red",
                label="exact recitation")
    acc_ax.set(title="poems recited exactly", xlabel="epoch", ylabel="accuracy (%)", ylim=PERCENT_LIMITS,
               xlim=bits_ax.get_xlim())
    acc_ax.legend(loc="upper left", fontsize=8)      # accuracy climbs from the lower left
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_length_curves(path: Path, by_length: dict[str, list[dict]], title: str) -> Path:
    """by_length: engine.dynamics.accuracy_by_length's {bucket: [{"epoch", "n", "correct", "accuracy"}]}."""
    fig, ax = percent_figure(title, "epoch")
    for bucket, curve in by_length.items():
        ax.plot([m["epoch"] for m in curve], [100 * m["accuracy"] for m in curve], "o-", ms=3,
                label=f"{bucket} chars (n={curve[0]['n']})")
    return save_figure(fig, path, legend_ax=ax)


def plot_first_recited(path: Path, first_by_length: dict[str, dict], evaluation_epochs: list[int], title: str) -> Path:
    """Per length bucket, the cumulative share of poems first recited exactly by each epoch (short of 100%
    by those never recited). first_by_length: engine.dynamics.first_recited_by_length; evaluation_epochs:
    every evaluation's epoch."""
    fig, ax = percent_figure(title, "epoch", "poems first recited exactly by then (%)")
    for bucket, counts in first_by_length.items():
        done = accumulate(counts["epochs"].get(epoch, 0) for epoch in evaluation_epochs)
        shares = [0.0] + [100 * recited / counts["n"] for recited in done]       # none recited before training
        ax.step([0, *evaluation_epochs], shares, where="post",
                label=f"{bucket} chars (n={counts['n']}, never: {counts['never']})")
    return save_figure(fig, path, legend_ax=ax)


def write_run_plots(out: Path, metrics: list[dict], lines: list[dict], title: str) -> list[Path]:
    """bits.png, accuracy_by_length_curve.png and first_recited.png of one run folder."""
    bits = [{"epoch": m["epoch"], "bits": m["bits"]} for m in metrics if "bits" in m]
    curve = dynamics.accuracy_curve(lines)
    return [plot_bits_and_accuracy(out / "bits.png", bits, curve, title),
            plot_length_curves(out / "accuracy_by_length_curve.png", dynamics.accuracy_by_length(lines), title),
            plot_first_recited(out / "first_recited.png", dynamics.first_recited_by_length(lines),
                               [m["epoch"] for m in curve], title)]


CAPACITY_BITS_PER_PARAMETER = 3.6     # Morris et al. 2025, GPT-style models trained to saturation


def interval_text(k: int, n: int) -> str:
    low, high = wilson_interval(k, n)
    return f"[{100 * low:.1f}, {100 * high:.1f}]"


def _bits(value: float) -> str:
    return f"{value:,.0f} bits" if abs(value) < 10_000 else f"{value / 1000:,.1f} kbit"


def memorization_section(results: dict) -> list[str]:
    """report.md lines of one run's memorization view (results.json's fields)."""
    k, n = results["correct"], results["n"]
    bits, learned = results["memorization"], results["dynamics"]
    lines = [
        "## Memorization", "",
        f"- exact recitation: {k} of {n} poems, {100 * k / n:.2f}% (95% Wilson interval {interval_text(k, n)})",
        f"- information of the training poems under the base model: {_bits(bits['base_bits'])} "
        f"({bits['target_tokens']:,} target tokens, {bits['base_bits'] / bits['target_tokens']:.2f} bits/token)",
        f"- bits gained by training: {_bits(bits['bits_gained'])} ({100 * bits['bits_gained_share']:.1f}% of it), "
        f"{bits['bits_per_parameter']:.3g} bits/parameter (saturated GPT-style models hold "
        f"~{CAPACITY_BITS_PER_PARAMETER}), "
        + (f"{_bits(bits['bits_per_memorized_poem'])} per memorized poem" if bits["bits_per_memorized_poem"]
           else "no poem memorized"),
        f"- over {learned['evaluations']} evaluations: {learned['ever_recited']} of {learned['poems']} poems recited "
        f"exactly at least once, {learned['stayed']} of them correct at every later evaluation; "
        f"{learned['forgotten_poems']} forgotten ({learned['forgetting_events']} forgetting events, "
        f"{learned['relearning_events']} relearned); median first-recited epoch: "
        f"{learned['median_first_recited_epoch'] or '-'}"]
    if "score_seconds" in results:
        measured = results["eval_seconds"] + results["score_seconds"]
        total = measured + results["train_seconds"]
        lines.append(f"- measuring it: evaluation {results['eval_seconds']:.1f} s + scoring {results['score_seconds']:.1f} s"
                     f" = {100 * measured / total:.1f}% of the run's {total:.0f} s of training and measurement")
    if results.get("by_length"):
        lines += ["", markdown_table(["poem characters", "poems", "correct", "accuracy %", "95% interval"],
                                     [[b["chars"], b["n"], b["correct"], f"{100 * b['accuracy']:.2f}",
                                       interval_text(b["correct"], b["n"])] for b in results["by_length"]])]
    lines += ["", "![bits and accuracy per epoch](bits.png)", "",
              "![accuracy per epoch by poem length](accuracy_by_length_curve.png)", "",
              "![first recited epoch by poem length](first_recited.png)"]
    return lines


# ---------------------------------------------------------------- tables

def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def cell(value: float | None, spec: str = ".3g", scale: float = 1.0) -> str:
    """A table cell: value / scale formatted by spec, '-' for no value."""
    return "-" if value is None else format(value / scale, spec)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(value) for value in row) + " |" for row in rows])


# ---------------------------------------------------------------- `cli.py data`

def histogram(values: list[int], bins: int = 8, width: int = 40) -> str:
    lo, hi = min(values), max(values)
    step = max(1, -(-(hi - lo + 1) // bins))
    counts = Counter((v - lo) // step for v in values)
    top = max(counts.values())
    return "\n".join(f"  {lo + b * step:>6}-{lo + (b + 1) * step - 1:<6} {counts[b]:>5} {'#' * round(width * counts[b] / top)}"
                     for b in range(max(counts) + 1))


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


def accuracy_tables(runs: list[dict]) -> str:
    """Our accuracy with its 95% interval beside the paper's figure, marked inside or outside it, in the
    layout of the paper's Table 1 (CN / ENG) and Table 2 (CN 256-512)."""
    ours = seed_groups(runs)
    models = PAPER_MODELS + sorted({run["model"] for run in runs} - set(PAPER_MODELS))

    def cells(model, key):
        group = ours.get((model, *key))
        return [accuracy_cell(group), paper_cell(PAPER_ACCURACY[key].get(model), group)]
    table1 = [[display_name(model), *cells(model, ("cn", 256)), *cells(model, ("en", 256))] for model in models]
    table2 = [[display_name(model), *cells(model, ("cn", 512))]
              for model in models if model in PAPER_ACCURACY[("cn", 512)] or (model, "cn", 512) in ours]
    return "\n".join([
        "Table 1: exact recitation accuracy (%), prompt + poem <= 256 characters, after the runs' epochs "
        "(the paper: 100). Ours: [95% Wilson interval], the seeds of a model pooled; the paper's figure "
        "is marked inside or outside it.", "",
        markdown_table(["Model", "CN (ours)", "CN (paper)", "ENG (ours)", "ENG (paper)"], table1), "",
        "Table 2: CN poems of 256-512 characters.", "",
        markdown_table(["Model", "CN 256-512 (ours)", "CN 256-512 (paper)"], table2)])


def cost_table(runs: list[dict]) -> str:
    body = []
    for run in runs:
        seconds, memorized = run_gpu_seconds(run), run["accuracy"] * run["n_poems"]
        bits = run.get("memorization")
        kbit = bits["bits_gained"] / 1000 if bits else None
        body.append([Path(run["run_dir"]).name, display_name(run["model"]), f"{run['lang']}-{run['length']}", run["n_poems"],
                     run["epochs"], f"{100 * run['accuracy']:.2f}", duration(run["train_seconds"]),
                     duration(run["eval_seconds"]), f"{run.get('device', '?')} x{run.get('world_size', 1)}",
                     f"{seconds / 3600:.3g}", cell(seconds / memorized if memorized else None, ".2f"),
                     cell(kbit, ",.1f"), cell(bits and bits["bits_per_parameter"]),
                     cell(seconds / kbit if kbit and kbit > 0 else None)])
    return markdown_table(["run", "model", "poems", "n", "epochs", "accuracy %", "train time", "eval time", "device",
                           "device-hours", "device-s per memorized poem", "kbit gained", "bits/parameter",
                           "device-s per kbit gained"], body)


def _label(run: dict) -> str:
    return f"{display_name(run['model'])} {run['lang']}-{run['length']}"


def plot_curves(runs: list[dict], path: Path) -> Path:
    """Memorization curves: exact-recitation accuracy per epoch of several runs in one figure."""
    fig, ax = percent_figure("Memorization curves", "epoch")
    for run in runs:
        _, evals = epoch_curve(read_jsonl(Path(run["run_dir"]) / "metrics.jsonl"))
        ax.plot([m["epoch"] for m in evals], [100 * m["accuracy"] for m in evals], "o-", markersize=3, label=_label(run))
    return save_figure(fig, path, legend_ax=ax)


def plot_by_length(runs: list[dict], path: Path) -> Path:
    labels = [length_bucket(edge) for edge in LENGTH_EDGES] + [length_bucket(LENGTH_EDGES[-1] + 1)]
    fig, ax = percent_figure("Accuracy by poem length", "poem length (characters)")
    for run in runs:        # results.json's accuracy per length bucket, else recomputed from generations.jsonl
        buckets = run.get("by_length") or summarize(read_jsonl(Path(run["run_dir"]) / "generations.jsonl"))["by_length"]
        ax.plot([labels.index(b["chars"]) for b in buckets], [100 * b["accuracy"] for b in buckets], "o-",
                label=_label(run))
    ax.set_xticks(range(len(labels)), labels)
    return save_figure(fig, path, legend_ax=ax)


def seed_groups(runs: list[dict]) -> dict[tuple, list[dict]]:
    """{(model, lang, length): its runs} in first-seen order; several runs are several seeds."""
    return dynamics.group_by(runs, lambda run: (run["model"], run["lang"], run["length"]))


def pooled(runs: list[dict]) -> tuple[int, int]:
    """(correct, n) over the seeds of one (model, set): one sample of the model's accuracy."""
    return sum(r["correct"] for r in runs), sum(r["n"] for r in runs)


def bits_per_parameter(runs: list[dict]) -> list[float]:
    """The bits gained per parameter of each scored seed (runs from before scoring have none)."""
    return [run["memorization"]["bits_per_parameter"] for run in runs if run.get("memorization")]


def accuracy_cell(runs: list[dict] | None) -> str:
    """'77.50 [75.6, 79.3]' (seeds pooled), '-' without runs."""
    if not runs:
        return "-"
    k, n = pooled(runs)
    return f"{100 * k / n:.2f} {interval_text(k, n)}"


def paper_cell(percent: float | None, runs: list[dict] | None) -> str:
    """The paper's figure, marked inside or outside our 95% interval."""
    if percent is None:
        return "-"
    if not runs:
        return f"{percent:.2f}"
    return f"{percent:.2f} ({'inside' if inside(*pooled(runs), percent) else 'outside'})"


def seeds_table(runs: list[dict]) -> str | None:
    """Mean and spread across seeds of accuracy and bits/parameter; None when no set has two seeds."""
    rows = []
    for (model, lang, length), group in seed_groups(runs).items():
        if len(group) < 2:
            continue
        acc = spread([100 * r["accuracy"] for r in group])
        per_param = bits_per_parameter(group)
        bits = spread(per_param) if per_param else None
        rows.append([Path(model).name, f"{lang}-{length}", ", ".join(str(r["config"]["seed"]) for r in group),
                     f"{acc['mean']:.2f} ± {acc['std']:.2f}", f"{acc['min']:.2f}-{acc['max']:.2f}",
                     f"{bits['mean']:.3g} ± {bits['std']:.2g}" if bits and bits["std"] is not None else "-"])
    if not rows:
        return None
    return markdown_table(["model", "poems", "seeds", "accuracy % (mean ± sample std)", "min-max",
                           "bits/parameter (mean ± std)"], rows)


def ranking_table(runs: list[dict]) -> str:
    """Per poem set, models ranked by accuracy (seeds pooled) with a two-proportion test of each gap
    to the next model down, beside their rank by bits gained per parameter (mean over the seeds)."""
    entries = []
    for (model, lang, length), group in seed_groups(runs).items():
        k, n = pooled(group)
        per_param = bits_per_parameter(group)
        entries.append({"model": model, "poems": f"{lang}-{length}", "correct": k, "n": n,
                        "sample": poem_sample(group),
                        "bits_per_parameter": sum(per_param) / len(per_param) if per_param else None})
    sections = []
    samples = dynamics.group_by(entries, lambda entry: (entry["poems"], entry["sample"]))
    for (poems, sample), group in samples.items():
        if sum(key[0] == poems for key in samples) > 1:        # models trained on other poems are not ranked together
            poems = f"{poems}, poem sample {min(sample)[:12]}"
        by_bits = sorted((e for e in group if e["bits_per_parameter"] is not None),
                         key=lambda e: -e["bits_per_parameter"])
        bits_rank = {e["model"]: rank for rank, e in enumerate(by_bits, 1)}
        rows = [[rank, Path(e["model"]).name, f"{100 * e['accuracy']:.2f} {interval_text(e['correct'], e['n'])}",
                 f"{e['correct']}/{e['n']}", gap_text(e["vs_next"]), cell(e["bits_per_parameter"]),
                 bits_rank.get(e["model"], "-")] for rank, e in enumerate(rank_by_accuracy(group), 1)]
        sections.append(f"{poems}:\n\n" + markdown_table(
            ["rank", "model", "accuracy % [95%]", "correct", "gap to the next (two-proportion z-test)",
             "bits/parameter", "rank by bits/parameter"], rows))
    return "\n\n".join(sections)


def poem_sample(runs: list[dict]) -> frozenset:
    """The poems a group of seeds trained on: their fingerprints (runs from before fingerprints: their
    count and seed, which chose the sample from the frozen set)."""
    return frozenset(run.get("config", {}).get("poems_sha256")
                     or f"{run.get('n_poems', run.get('n'))} poems, seed {run.get('config', {}).get('seed', 0)}" for run in runs)


def gap_text(test: dict | None) -> str:
    """A ranking row's two_proportion_test against the next model down ('-' for the last)."""
    if test is None:
        return "-"
    p_value = "p < 0.001" if test["p_value"] < 0.001 else f"p = {test['p_value']:.3f}"
    verdict = "significant" if test["significant"] else "not significant"
    return f"{100 * test['difference']:+.2f} pp, {p_value} ({verdict})"


REPORT_MARK = "<!-- written by cli.py report: rewritten by the next report into this folder -->"
# Settings that do not change what a run measures: runs that differ only in these (and the seed) are seeds
# of one experiment.
NOT_THE_EXPERIMENT = {"seed", "out", "resume", "device", "eval_every", "checkpoint_every", "log_every",
                      "keep_checkpoints", "poems_sha256"}


def check_comparable(runs: list[dict]) -> None:
    """Runs of one model and poem set must differ in the seed alone: the tables pool them as seeds."""
    for (model, lang, length), group in seed_groups(runs).items():
        first = dict(group[0].get("config", {}))
        for run in group[1:]:
            other = run.get("config", {})
            differences = [f"--{name.replace('_', '-')} {first.get(name)} vs {other.get(name)}"
                           for name in sorted(set(first) | set(other)) if name not in NOT_THE_EXPERIMENT
                           and first.get(name) != other.get(name)]
            if differences:
                raise ValueError(f"report: {group[0]['run_dir']} and {run['run_dir']} ({model} {lang}-{length}) differ "
                                 f"in {', '.join(differences)}, not only in the seed: the tables would pool them as "
                                 "seeds of one experiment. Report them separately (one report per setting)")


def report_folder(runs: list[dict], out) -> Path:
    """Where the report goes: --out, else the runs' common parent folder; never into a run's folder, and
    never over a report.md that cli.py report did not write."""
    folder = Path(out) if out is not None else Path(os.path.commonpath([Path(r["run_dir"]).resolve() for r in runs]))
    if out is None and is_run_folder(folder):
        folder = folder.parent
    inside = next((parent for parent in [folder, *folder.parents] if is_run_folder(parent)), None)
    if inside is not None:
        raise ValueError(f"report: {folder} is inside the run {inside}, whose files are its own: pass --out with "
                         "another folder")
    existing = folder / "report.md"
    if existing.is_file() and not existing.read_text(encoding="utf-8").startswith(REPORT_MARK):
        raise ValueError(f"report: {existing} was not written by cli.py report: pass --out with another folder")
    return folder


def report(run_dirs: list[str], out=None) -> tuple[str, Path]:
    """report.md (the paper's tables beside ours, cost per run) with curves.png and accuracy_by_length.png
    in `out` (None: the runs' common parent folder). Files among run_dirs (a shell glob over a sweep's
    folder brings its report and plots) are passed over. Returns the markdown and the report's path."""
    runs = find_runs([d for d in run_dirs if not Path(d).is_file()])
    if not runs:
        raise ValueError("report: no run folders given: pass the folders of finished memorize runs")
    check_comparable(runs)
    out = report_folder(runs, out)
    out.mkdir(parents=True, exist_ok=True)
    order = {model: i for i, model in enumerate(PAPER_MODELS)}
    runs.sort(key=lambda run: (order.get(run["model"], len(order)), run["model"], run["lang"], run["length"],
                               run.get("config", {}).get("seed", 0)))
    plot_curves(runs, out / "curves.png")
    plot_by_length(runs, out / "accuracy_by_length.png")
    seeds = seeds_table(runs)
    text = "\n".join([
        REPORT_MARK, "",
        "# Memorization: our runs beside the paper", "",
        "Paper: \"Schrödinger's Memory: Large Language Models\", Tables 1 and 2 (2,000 poems per set, 100 epochs).", "",
        accuracy_tables(runs), "",
        *(["## Across seeds", "", seeds, ""] if seeds else []),
        "## Memorization ability", "",
        "Models ranked by exact recitation on the same poems (the same poem fingerprints), each gap to the next "
        "model down tested with a two-sided two-proportion z-test at 5%; bits gained per parameter is the "
        "information view of the same runs.",
        "", ranking_table(runs), "",
        "## Cost per run", "",
        cost_table(runs), "",
        "![accuracy per epoch](curves.png)", "",
        "![accuracy by poem length](accuracy_by_length.png)", "",
        "Runs: " + ", ".join(run["run_dir"] for run in runs)]) + "\n"
    write_text(out / "report.md", text)
    return text, out / "report.md"
