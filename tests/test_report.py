"""engine/report.py: the data statistics of `cli.py data` (the paper's tables: tests/test_sweep.py)."""
from engine.report import describe
from models import load_tokenizer


def test_describe():
    text = describe("cn", 256, load_tokenizer("tiny-qwen2"), 16384)
    assert text.startswith("2000 cn poems") and "characters" in text and "tokens" in text
    assert "efficiency" in text and "#" in text
