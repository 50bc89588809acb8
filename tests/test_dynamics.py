"""Per-poem dynamics: the records rebuild the accuracy curves, and forgetting/relearning is counted."""
import random

import pytest

from engine.dynamics import (accuracy_by_length, accuracy_curve, dynamics_summary, eval_lines, first_recited_by_length,
                             poem_dynamics, transitions)
from engine.evaluate import summarize
from engine.report import plot_bits_and_accuracy, plot_first_recited, plot_length_curves
from engine.runs import append_jsonl, keep_jsonl, read_jsonl

EPOCHS = [10, 20, 30, 40, 50]
# Each poem's correctness at the five evaluations, and its length in characters.
HISTORIES = {
    0: ("FTFTT", 30),     # recited at 20, forgotten at 30, relearned at 40
    1: ("FFFFF", 40),     # never recited
    2: ("TTTTT", 120),    # recited from the first evaluation on
    3: ("TFFTF", 130),    # forgotten twice, relearned once after a two-evaluation gap
}


def records(correct: list[bool], lengths: list[int]) -> list[dict]:
    """engine.evaluate.evaluate's per-poem records, as far as the dynamics read them."""
    return [{"target": "诗" * n, "correct": c, "category": "correct" if c else "severe",
             "edit_distance": 0.0 if c else 0.5} for c, n in zip(correct, lengths)]


def history_lines() -> list[dict]:
    lines = []
    for at, epoch in enumerate(EPOCHS):
        marks = [HISTORIES[p][0][at] == "T" for p in sorted(HISTORIES)]
        lines += eval_lines(epoch, records(marks, [HISTORIES[p][1] for p in sorted(HISTORIES)]))
    return lines


def test_per_poem_records_reproduce_the_accuracy_curve_exactly():
    rng = random.Random(0)
    lengths = [rng.randint(1, 450) for _ in range(157)]
    lines, summaries = [], {}
    for epoch in (3, 6, 9, 12):
        evaluation = records([rng.random() < epoch / 12 for _ in lengths], lengths)
        summaries[epoch] = summarize(evaluation)
        lines += eval_lines(epoch, evaluation)
    rng.shuffle(lines)                                    # order in the file does not matter
    curve = accuracy_curve(lines)
    assert [m["epoch"] for m in curve] == [3, 6, 9, 12]
    for m in curve:
        assert (m["n"], m["correct"], m["accuracy"]) == (157, summaries[m["epoch"]]["correct"],
                                                         summaries[m["epoch"]]["accuracy"])
    by_length = accuracy_by_length(lines)
    for epoch, summary in summaries.items():
        assert [b["chars"] for b in summary["by_length"]] == list(by_length)
        for bucket in summary["by_length"]:
            at_epoch = next(m for m in by_length[bucket["chars"]] if m["epoch"] == epoch)
            assert (at_epoch["n"], at_epoch["correct"], at_epoch["accuracy"]) == \
                (bucket["n"], bucket["correct"], bucket["accuracy"])


def test_a_poem_forgotten_and_relearned_is_counted_as_such():
    poems = {p["poem"]: p for p in poem_dynamics(history_lines())}
    assert poems[0] == {"poem": 0, "chars": 30, "first_recited": 20, "stayed": False, "forgotten": 1,
                        "relearned": 1, "final": True}
    assert poems[1] == {"poem": 1, "chars": 40, "first_recited": None, "stayed": False, "forgotten": 0,
                        "relearned": 0, "final": False}
    assert poems[2] == {"poem": 2, "chars": 120, "first_recited": 10, "stayed": True, "forgotten": 0,
                        "relearned": 0, "final": True}
    assert poems[3] == {"poem": 3, "chars": 130, "first_recited": 10, "stayed": False, "forgotten": 2,
                        "relearned": 1, "final": False}
    assert dynamics_summary(history_lines()) == {
        "evaluations": 5, "poems": 4, "ever_recited": 3, "stayed": 1, "forgotten_poems": 2,
        "forgetting_events": 3, "relearning_events": 2, "median_first_recited_epoch": 10}


@pytest.mark.parametrize("marks, want", [("", (0, 0)), ("T", (0, 0)), ("FT", (0, 0)), ("TF", (1, 0)),
                                         ("TFT", (1, 1)), ("TFFFT", (1, 1)), ("TFTFT", (2, 2)), ("FTFF", (1, 0))])
def test_transitions(marks, want):
    assert transitions([m == "T" for m in marks]) == want


def test_first_recited_epochs_by_length():
    assert first_recited_by_length(history_lines()) == {
        "1-50": {"n": 2, "never": 1, "epochs": {20: 1}},
        "101-150": {"n": 2, "never": 0, "epochs": {10: 2}},
    }


def test_eval_lines_carry_each_poems_bits():
    lines = eval_lines(7, records([True, False], [12, 300]), bits=[10.123456, 99.5])
    assert lines == [{"epoch": 7, "poem": 0, "chars": 12, "correct": True, "category": "correct",
                      "edit_distance": 0.0, "bits": 10.1235},
                     {"epoch": 7, "poem": 1, "chars": 300, "correct": False, "category": "severe",
                      "edit_distance": 0.5, "bits": 99.5}]
    with pytest.raises(ValueError, match="score the evaluated poems"):
        eval_lines(7, records([True, False], [12, 300]), bits=[1.0])


def test_evals_file_round_trip_and_resume(tmp_path):
    path = tmp_path / "evals.jsonl"
    lines = history_lines()
    append_jsonl(path, lines[:8])
    append_jsonl(path, lines[8:])
    assert read_jsonl(path) == lines
    keep_jsonl(path, lambda line: line["epoch"] <= 30)
    assert read_jsonl(path) == [line for line in lines if line["epoch"] <= 30]
    keep_jsonl(tmp_path / "absent.jsonl", lambda line: False)       # a run without evaluations yet: nothing to drop


def test_plots_are_written(tmp_path):
    lines = history_lines()
    bits = [{"epoch": 0, "bits": 5200.0}] + [{"epoch": e, "bits": 5200.0 / e} for e in EPOCHS]
    paths = [plot_bits_and_accuracy(tmp_path / "bits.png", bits, accuracy_curve(lines), "bits"),
             plot_length_curves(tmp_path / "by_length.png", accuracy_by_length(lines), "by length"),
             plot_first_recited(tmp_path / "first.png", first_recited_by_length(lines), EPOCHS, "first")]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
