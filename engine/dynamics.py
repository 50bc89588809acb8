"""How each poem is learned and forgotten, from the per-poem results of every evaluation.

The record (evals.jsonl in a run folder): one line per (evaluation epoch, training poem),
    {"epoch": 10, "poem": 3, "chars": 57, "correct": true, "category": "correct", "edit_distance": 0.0,
     "bits": 12.7}
`poem` is the poem's index in the run's poem list (the same at every evaluation), `chars` its
length in characters (engine/evaluate.py buckets accuracy by it), `bits` (when scored) its
target's NLL under the model at that epoch (engine/scoring.py). From these lines come the
accuracy curves (overall and per length bucket: the paper's length effect over training) and
each poem's history: when it was first recited exactly, and whether it was forgotten and relearned.
"""
from __future__ import annotations

from collections import Counter

from engine.evaluate import length_bucket

EVALS_FILE = "evals.jsonl"


def eval_lines(epoch: int, records: list[dict], bits: list[float] | None = None) -> list[dict]:
    """evals.jsonl lines of one evaluation from engine.evaluate.evaluate's records (in poem order)
    and, if scored, each poem's bits (engine.scoring.poem_bits, same order)."""
    lines = [{"epoch": epoch, "poem": i, "chars": len(r["target"]), "correct": bool(r["correct"]),
              "category": r["category"], "edit_distance": r["edit_distance"]} for i, r in enumerate(records)]
    if bits is not None:
        if len(bits) != len(lines):
            raise ValueError(f"{len(bits)} scores for {len(lines)} evaluated poems: score the evaluated poems")
        for line, b in zip(lines, bits):
            line["bits"] = round(b, 4)
    return lines


def group_by(items, key) -> dict:
    """{key(item): [its items]}, keys in the order they first appear."""
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def _by_length(items: list[dict]) -> dict[str, list[dict]]:
    """{length bucket: its items}, buckets from short to long."""
    return group_by(sorted(items, key=lambda item: item["chars"]), lambda item: length_bucket(item["chars"]))


def _accuracy(lines: list[dict]) -> dict:
    correct = sum(line["correct"] for line in lines)
    return {"n": len(lines), "correct": correct, "accuracy": correct / len(lines)}


def accuracy_curve(lines: list[dict]) -> list[dict]:
    """[{"epoch", "n", "correct", "accuracy"}] per evaluation, in epoch order."""
    by_epoch = group_by(sorted(lines, key=lambda line: line["epoch"]), lambda line: line["epoch"])
    return [{"epoch": epoch, **_accuracy(group)} for epoch, group in by_epoch.items()]


def accuracy_by_length(lines: list[dict]) -> dict[str, list[dict]]:
    """{length bucket: accuracy_curve of its poems}, buckets from short to long."""
    return {name: accuracy_curve(group) for name, group in _by_length(lines).items()}


def poem_dynamics(lines: list[dict]) -> list[dict]:
    """Per poem (by index): chars, first_recited (epoch or None), stayed, forgotten, relearned, final."""
    histories = group_by(sorted(lines, key=lambda line: line["epoch"]), lambda line: line["poem"])
    poems = []
    for poem, history in sorted(histories.items()):
        marks = [line["correct"] for line in history]
        first = next((i for i, correct in enumerate(marks) if correct), None)
        forgotten, relearned = transitions(marks)
        poems.append({"poem": poem, "chars": history[0]["chars"],
                      "first_recited": None if first is None else history[first]["epoch"],
                      "stayed": first is not None and all(marks[first:]),
                      "forgotten": forgotten, "relearned": relearned, "final": marks[-1]})
    return poems


def transitions(marks: list[bool]) -> tuple[int, int]:
    """(forgetting events: correct then wrong at the next evaluation, relearning events: wrong
    then correct after a forgetting) in one poem's sequence of evaluations."""
    forgotten = relearned = 0
    for previous, current in zip(marks, marks[1:]):
        if previous and not current:
            forgotten += 1
        elif current and not previous and forgotten:
            relearned += 1
    return forgotten, relearned


def first_recited_by_length(lines: list[dict]) -> dict[str, dict]:
    """{length bucket: {"n", "never", "epochs": {epoch: poems first recited then}}}, short to long."""
    return {name: {"n": len(poems), "never": sum(p["first_recited"] is None for p in poems),
                   "epochs": dict(sorted(Counter(p["first_recited"] for p in poems
                                                 if p["first_recited"] is not None).items()))}
            for name, poems in _by_length(poem_dynamics(lines)).items()}


def dynamics_summary(lines: list[dict]) -> dict:
    """The run-level counts for results.json and report.md."""
    poems = poem_dynamics(lines)
    first = sorted(p["first_recited"] for p in poems if p["first_recited"] is not None)
    return {
        "evaluations": len({line["epoch"] for line in lines}),
        "poems": len(poems),
        "ever_recited": len(first),
        "stayed": sum(p["stayed"] for p in poems),
        "forgotten_poems": sum(p["forgotten"] > 0 for p in poems),
        "forgetting_events": sum(p["forgotten"] for p in poems),
        "relearning_events": sum(p["relearned"] for p in poems),
        "median_first_recited_epoch": first[len(first) // 2] if first else None,
    }
