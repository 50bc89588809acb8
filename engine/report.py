"""What a run leaves behind for a researcher: results.json, generations.jsonl, a plot of loss
and recitation accuracy per epoch, and a short report.md."""
from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


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
    fig.tight_layout()
    path = out / "curve.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_run_report(out: Path, results: dict, records: list[dict]) -> None:
    from engine.evaluate import write_results
    out = Path(out)
    write_results(out, results, records)
    title = f"{results['model']} {results['lang']}-{results['length']}: {results['n_poems']} poems"
    plot_run(out, title)
    cats = results.get("categories", {})
    lines = [
        f"# {title}",
        "",
        f"- exact recitation accuracy: **{100 * results['accuracy']:.2f}%** after {results['epochs']} epochs",
        "- errors: " + ", ".join(f"{name} {count}" for name, count in cats.items()),
        f"- trained tokens: {results['train_tokens']:,} in {results['train_seconds']:.1f} s "
        f"({results['tokens_per_second']:,.0f} tokens/s) on {results['device']}; evaluation {results['eval_seconds']:.1f} s",
        f"- peak memory: {results['peak_memory_bytes'] / 2**30:.2f} GiB; parameters: {results['parameters']:,}",
        "",
        "![loss and accuracy per epoch](curve.png)",
        "",
        "Files: results.json (all numbers and the full config), metrics.jsonl (per step and per epoch),",
        "generations.jsonl (prompt, target, output, correct per poem), model/ (the final weights, Hugging Face format).",
    ]
    wrong = [r for r in records if not r.get("correct")][:3]
    if wrong:
        lines += ["", "## Some wrong recitations", ""]
        for r in wrong:
            lines += [f"- {r['prompt']}", f"  - target: {r['target']!r}", f"  - output: {r['output']!r}"]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
