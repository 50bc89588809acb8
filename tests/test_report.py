"""engine/report.py: the data statistics of `cli.py data` (the paper's tables: tests/test_sweep.py)."""
from engine.report import describe
from models import load_tokenizer


def test_describe():
    text = describe("cn", 256, load_tokenizer("tiny-qwen2"), 16384)
    assert text.startswith("2000 cn poems") and "characters" in text and "tokens" in text
    assert "efficiency" in text and "#" in text


def test_report_names_a_malformed_results_file(tmp_path, capsys):
    import json

    import cli
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text('{"model": "tiny-qwen2", ')
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"model": "m", "accuracy": 0.5}))
    for folder, message in (("broken", "is not valid JSON"), ("eval", "is not a finished memorize run's results")):
        assert cli.main(["report", str(tmp_path / folder)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {tmp_path / folder / 'results.json'} {message}") and "\n" not in err, err
