"""The memorization sections of the reports, from results.json-shaped dicts."""
from engine.report import accuracy_cell, memorization_section, paper_cell, ranking_table, seeds_table


def run(model="qwen2-0.5b", seed=0, correct=1550, n=2000, bits_per_parameter=0.002, lang="cn", length=256):
    return {"model": model, "lang": lang, "length": length, "correct": correct, "n": n, "accuracy": correct / n,
            "config": {"seed": seed},
            "memorization": {"base_bits": 1.2e6, "trained_bits": 2e5, "bits_gained": 1e6, "bits_gained_share": 1 / 1.2,
                             "bits_per_parameter": bits_per_parameter, "bits_per_memorized_poem": 1e6 / correct,
                             "target_tokens": 150_000},
            "dynamics": {"evaluations": 10, "poems": n, "ever_recited": 1600, "stayed": 1500, "forgotten_poems": 90,
                         "forgetting_events": 120, "relearning_events": 40, "median_first_recited_epoch": 40},
            "by_length": [{"chars": "1-50", "n": 800, "correct": 700, "accuracy": 700 / 800},
                          {"chars": "51-100", "n": 1200, "correct": 850, "accuracy": 850 / 1200}]}


def test_run_section_states_interval_bits_and_dynamics():
    text = "\n".join(memorization_section(run()))
    assert "1550 of 2000 poems, 77.50% (95% Wilson interval [75.6, 79.3])" in text
    assert "1,200.0 kbit (150,000 target tokens, 8.00 bits/token)" in text
    assert "1,000.0 kbit (83.3% of it), 0.002 bits/parameter" in text
    assert "1600 of 2000 poems recited exactly at least once, 1500 of them" in text and "120 forgetting events" in text
    assert "| 1-50 | 800 | 700 | 87.50 | [85.0, 89.6] |" in text
    assert "bits.png" in text and "first_recited.png" in text


def test_table_cells_pool_seeds_and_mark_the_papers_figure():
    runs = [run(seed=0, correct=1550), run(seed=1, correct=1530)]
    assert accuracy_cell(runs[:1]) == "77.50 [75.6, 79.3]"
    assert accuracy_cell(runs) == "77.00 [75.7, 78.3]"          # 3080 of 4000
    assert paper_cell(77.5, runs) == "77.50 (inside)" and paper_cell(96.9, runs) == "96.90 (outside)"
    assert paper_cell(77.5, None) == "77.50" and paper_cell(None, runs) == "-" and accuracy_cell(None) == "-"


def test_seeds_table_aggregates_both_seeds():
    table = seeds_table([run(seed=0, correct=1550, bits_per_parameter=0.002),
                         run(seed=1, correct=1530, bits_per_parameter=0.004), run(model="qwen2-1.5b")])
    rows = [line for line in table.splitlines() if line.startswith("| qwen2")]
    assert rows == ["| qwen2-0.5b | cn-256 | 0, 1 | 77.00 ± 0.71 | 76.50-77.50 | 0.003 ± 0.0014 |"]
    assert seeds_table([run()]) is None


def test_ranking_tests_the_gaps_between_neighbours():
    table = ranking_table([run("qwen2-0.5b", correct=1550, bits_per_parameter=0.004),
                           run("qwen2-1.5b", correct=1938, bits_per_parameter=0.001),
                           run("qwen1.5-0.5b", correct=1530, bits_per_parameter=0.003)])
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[1] for row in rows] == ["qwen2-1.5b", "qwen2-0.5b", "qwen1.5-0.5b"]
    assert "(significant)" in rows[0] and "(not significant)" in rows[1] and rows[2].split(" | ")[4] == "-"
    assert [row.split(" | ")[-1] for row in rows] == ["3 |", "1 |", "2 |"]
