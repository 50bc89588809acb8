"""The run report's memorization plots (PNG, matplotlib's Agg backend):

  bits.png          bits of the training poems under the model at each evaluation (epoch 0:
                    the base model, the data's information) beside the accuracy with its 95%
                    Wilson band;
  by_length.png     accuracy against epoch per length bucket (the paper's length effect over
                    training);
  first_recited.png per length bucket, the cumulative share of poems recited exactly for the
                    first time by each epoch (the curve stops below 100% by the share never
                    recited).
Inputs are the lists engine/dynamics.py and metrics.jsonl hold, so a plot can be redrawn from a
finished run folder.
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
