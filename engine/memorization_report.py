"""The memorization view of a run and of a set of runs: plots and report sections.

Plots (PNG, matplotlib's Agg backend), redrawn from a run folder's metrics.jsonl and evals.jsonl:
  bits.png             bits of the training poems under the model at each evaluation (epoch 0:
                       the base model, the data's information) beside the accuracy with its 95%
                       Wilson band;
  accuracy_by_length_curve.png   accuracy against epoch per length bucket (the paper's length
                       effect over training);
  first_recited.png    per length bucket, the cumulative share of poems recited exactly for the
                       first time by each epoch (it stops below 100% by the share never recited).
Markdown: run_section (report.md of one run: accuracy with its interval, bits, dynamics, per
length bucket), and for `cli.py report`: accuracy_cell / paper_cell (Table 1/2 cells with the
interval and whether the paper's figure falls inside), seeds_table (mean and spread across
seeds), ranking_table (the memorization-ability ranking).
"""
from __future__ import annotations

from pathlib import Path

from engine.report import pyplot
from engine.stats import wilson_interval

PERCENT_LIMITS = (-2, 102)      # 0% and 100% lines stay visible inside the frame


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return Path(path)


def plot_bits_and_accuracy(path: Path, bits_curve: list[dict], accuracy_curve: list[dict], title: str) -> Path:
    """bits_curve: [{"epoch", "bits"}] (epoch 0 = base model); accuracy_curve: [{"epoch", "n", "correct"}]."""
    plt = pyplot()
    fig, (bits_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    bits_ax.plot([m["epoch"] for m in bits_curve], [m["bits"] / 1000 for m in bits_curve], "o-", color="tab:purple")
    if bits_curve and bits_curve[0]["epoch"] == 0:
        base = bits_curve[0]["bits"] / 1000
        bits_ax.axhline(base, ls="--", color="gray", lw=1)
        bits_ax.annotate(f"base model: {base:,.1f} kbit", (0, base), textcoords="offset points", xytext=(8, -14),
                         color="gray", fontsize=8)
    bits_ax.set_xlabel("epoch")
    bits_ax.set_ylabel("NLL of the training poems' targets (kbit)")
    bits_ax.set_ylim(bottom=0)
    bits_ax.set_title("information left to learn")
    epochs = [m["epoch"] for m in accuracy_curve]
    bands = [wilson_interval(m["correct"], m["n"]) for m in accuracy_curve]
    acc_ax.fill_between(epochs, [100 * lo for lo, _ in bands], [100 * hi for _, hi in bands], color="tab:red",
                        alpha=0.2, lw=0, label="95% Wilson interval")
    acc_ax.plot(epochs, [100 * m["correct"] / m["n"] for m in accuracy_curve], "o-", color="tab:red",
                label="exact recitation")
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("accuracy (%)")
    acc_ax.set_ylim(*PERCENT_LIMITS)
    acc_ax.set_xlim(bits_ax.get_xlim())
    acc_ax.legend(loc="lower right", fontsize=8)
    acc_ax.set_title("poems recited exactly")
    fig.suptitle(title)
    return _save(fig, path)


def plot_accuracy_by_length(path: Path, by_length: dict[str, list[dict]], title: str) -> Path:
    """by_length: engine.dynamics.accuracy_by_length's {bucket: [{"epoch", "n", "correct", "accuracy"}]}."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for bucket, curve in by_length.items():
        ax.plot([m["epoch"] for m in curve], [100 * m["accuracy"] for m in curve], "o-", ms=3,
                label=f"{bucket} chars (n={curve[0]['n']})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("exact recitation accuracy (%)")
    ax.set_ylim(*PERCENT_LIMITS)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def plot_first_recited(path: Path, first_by_length: dict[str, dict], evaluation_epochs: list[int], title: str) -> Path:
    """first_by_length: engine.dynamics.first_recited_by_length; evaluation_epochs: every evaluation's epoch."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for bucket, counts in first_by_length.items():
        shares, done = [0.0], 0                  # none recited before training
        for epoch in evaluation_epochs:
            done += counts["epochs"].get(epoch, 0)
            shares.append(100 * done / counts["n"])
        ax.step([0, *evaluation_epochs], shares, where="post",
                label=f"{bucket} chars (n={counts['n']}, never: {counts['never']})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("poems first recited exactly by then (%)")
    ax.set_ylim(*PERCENT_LIMITS)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def write_run_plots(out: Path, metrics: list[dict], lines: list[dict], title: str) -> list[Path]:
    """bits.png, accuracy_by_length_curve.png and first_recited.png of one run folder."""
    from engine.dynamics import accuracy_by_length, accuracy_curve, first_recited_by_length
    out = Path(out)
    bits = [{"epoch": m["epoch"], "bits": m["bits"]} for m in metrics if "bits" in m]
    curve = accuracy_curve(lines)
    return [plot_bits_and_accuracy(out / "bits.png", bits, curve, title),
            plot_accuracy_by_length(out / "accuracy_by_length_curve.png", accuracy_by_length(lines), title),
            plot_first_recited(out / "first_recited.png", first_recited_by_length(lines),
                               [m["epoch"] for m in curve], title)]


# ---------------------------------------------------------------- markdown

CAPACITY_BITS_PER_PARAMETER = 3.6     # Morris et al. 2025, GPT-style models trained to saturation


def interval_text(k: int, n: int) -> str:
    low, high = wilson_interval(k, n)
    return f"[{100 * low:.1f}, {100 * high:.1f}]"


def p_text(p_value: float) -> str:
    return "p < 0.001" if p_value < 0.001 else f"p = {p_value:.3f}"


def _bits(value: float) -> str:
    return f"{value:,.0f} bits" if abs(value) < 10_000 else f"{value / 1000:,.1f} kbit"


def run_section(results: dict) -> list[str]:
    """report.md lines of one run's memorization view (results.json's fields)."""
    k, n = results["correct"], results["n"]
    lines = ["## Memorization", "",
             f"- exact recitation: {k} of {n} poems, {100 * k / n:.2f}% (95% Wilson interval {interval_text(k, n)})"]
    bits = results.get("memorization")
    if bits:
        per_token = bits["base_bits"] / bits["target_tokens"] if bits.get("target_tokens") else None
        lines += [
            f"- information of the training poems under the base model: {_bits(bits['base_bits'])}"
            + (f" ({bits['target_tokens']:,} target tokens, {per_token:.2f} bits/token)" if per_token else ""),
            f"- bits gained by training: {_bits(bits['bits_gained'])} ({100 * bits['bits_gained_share']:.1f}% of it), "
            f"{bits['bits_per_parameter']:.3g} bits/parameter (saturated GPT-style models hold "
            f"~{CAPACITY_BITS_PER_PARAMETER}), "
            + (f"{_bits(bits['bits_per_memorized_poem'])} per memorized poem" if bits["bits_per_memorized_poem"]
               else "no poem memorized")]
    dynamics = results.get("dynamics")
    if dynamics:
        lines.append(
            f"- over {dynamics['evaluations']} evaluations: {dynamics['ever_recited']} poems recited exactly at least "
            f"once, {dynamics['stayed']} of them correct at every later evaluation; {dynamics['forgotten_poems']} "
            f"poems forgotten ({dynamics['forgetting_events']} forgetting events, {dynamics['relearning_events']} "
            f"relearned); median first-recited epoch: {dynamics['median_first_recited_epoch'] or '-'}")
    buckets = results.get("by_length") or []
    if buckets:
        from engine.experiments import markdown_table
        lines += ["", markdown_table(["poem characters", "poems", "correct", "accuracy %", "95% interval"],
                                     [[b["chars"], b["n"], b["correct"], f"{100 * b['accuracy']:.2f}",
                                       interval_text(b["correct"], b["n"])] for b in buckets])]
    lines += ["", "![bits and accuracy per epoch](bits.png)", "",
              "![accuracy per epoch by poem length](accuracy_by_length_curve.png)", "",
              "![first recited epoch by poem length](first_recited.png)"]
    return lines


# ---------------------------------------------------------------- several runs (`cli.py report`)

def seed_groups(runs: list[dict]) -> dict[tuple, list[dict]]:
    """{(model, lang, length): its runs} in first-seen order; several runs are several seeds."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["model"], run["lang"], run["length"]), []).append(run)
    return groups


def pooled(runs: list[dict]) -> tuple[int, int]:
    """(correct, n) over the seeds of one (model, set): one sample of the model's accuracy."""
    return sum(r["correct"] for r in runs), sum(r["n"] for r in runs)


def accuracy_cell(runs: list[dict] | None) -> str:
    """'77.50 [75.6, 79.3]' (seeds pooled), '-' without runs."""
    if not runs:
        return "-"
    k, n = pooled(runs)
    return f"{100 * k / n:.2f} {interval_text(k, n)}"


def paper_cell(percent: float | None, runs: list[dict] | None) -> str:
    """The paper's figure, marked inside or outside our 95% interval."""
    from engine.stats import inside
    if percent is None:
        return "-"
    if not runs:
        return f"{percent:g}"
    return f"{percent:g} ({'inside' if inside(*pooled(runs), percent) else 'outside'})"


def seeds_table(runs: list[dict]) -> str | None:
    """Mean and spread across seeds of accuracy and bits/parameter; None when no set has two seeds."""
    from engine.experiments import markdown_table
    from engine.stats import spread
    rows = []
    for (model, lang, length), group in seed_groups(runs).items():
        if len(group) < 2:
            continue
        acc = spread([100 * r["accuracy"] for r in group])
        per_param = [r["memorization"]["bits_per_parameter"] for r in group if r.get("memorization")]
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
    to the next model down, beside their rank by bits gained per parameter."""
    from engine.experiments import markdown_table
    from engine.stats import rank_by_accuracy
    sections = []
    by_set: dict[tuple, list[dict]] = {}
    for (model, lang, length), group in seed_groups(runs).items():
        k, n = pooled(group)
        per_param = [r["memorization"]["bits_per_parameter"] for r in group if r.get("memorization")]
        by_set.setdefault((lang, length), []).append(
            {"model": model, "correct": k, "n": n, "seeds": len(group),
             "bits_per_parameter": sum(per_param) / len(per_param) if per_param else None})
    for (lang, length), entries in by_set.items():
        ranked = rank_by_accuracy(entries)
        by_bits = sorted((e for e in entries if e["bits_per_parameter"] is not None),
                         key=lambda e: -e["bits_per_parameter"])
        bits_rank = {e["model"]: i + 1 for i, e in enumerate(by_bits)}
        rows = []
        for i, e in enumerate(ranked):
            test = e["vs_next"]
            gap = "-" if test is None else (f"{100 * test['difference']:+.2f} pp, {p_text(test['p_value'])}"
                                            + (" (significant)" if test["significant"] else " (not significant)"))
            rows.append([i + 1, Path(e["model"]).name, f"{100 * e['accuracy']:.2f} {interval_text(e['correct'], e['n'])}",
                         f"{e['correct']}/{e['n']}", gap,
                         "-" if e["bits_per_parameter"] is None else f"{e['bits_per_parameter']:.3g}",
                         bits_rank.get(e["model"], "-")])
        sections.append(f"{lang}-{length}:\n\n" + markdown_table(
            ["rank", "model", "accuracy % [95%]", "correct", "gap to the next (two-proportion z-test)",
             "bits/parameter", "rank by bits/parameter"], rows))
    return "\n\n".join(sections)
