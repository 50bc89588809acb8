import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.data import (IGNORE, Poem, default_format, encode_examples, format_prompt,
                         load_poems, poem_chars, prompt_text, rows_to_poems, stop_token_ids, target_eos_id)
from models import load_tokenizer
from tests.helpers import transformers_side

ROOT = Path(__file__).resolve().parent.parent
EN_FIXTURE = ROOT / "tests" / "fixtures" / "poems-en.jsonl"
FROZEN = {length: ROOT / "data" / f"poems-cn-{length}.jsonl" for length in (256, 512)}
TINY = ROOT / "models" / "assets" / "tiny-tokenizer"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-qwen2")


def jsonl_rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------- the frozen CN benchmark

@pytest.mark.parametrize("length,lo,hi", [(256, 0, 256), (512, 256, 512)])
def test_frozen_files(length, lo, hi):
    import opencc
    t2s = opencc.OpenCC("t2s").convert
    lines = FROZEN[length].read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert all(line == json.dumps(row, ensure_ascii=False, sort_keys=True) for line, row in zip(lines, rows))
    assert len(rows) == 2000
    assert all(sorted(r) == ["author", "content", "dynasty", "title"] for r in rows)
    assert len({(r["dynasty"], r["author"], r["title"]) for r in rows}) == 2000
    poems = [Poem(**r) for r in rows]
    assert all(lo < poem_chars(p, "cn") <= hi for p in poems)
    assert {p.dynasty for p in poems} == {"唐代", "宋代"}
    for p in poems:
        assert p.author and p.title and p.content and p.content == p.content.strip()
        for text in (p.author, p.title, p.content):
            assert "□" not in text and t2s(text) == text
    assert load_poems("cn", length) == poems      # the frozen sample is the whole file, in file order


@pytest.mark.skipif(not os.environ.get("CHINESE_POETRY_TGZ"), reason="set CHINESE_POETRY_TGZ to chinese-poetry-2.0.1.tgz")
def test_build_cn_is_bit_identical(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "data" / "build_cn.py"), "--tarball", os.environ["CHINESE_POETRY_TGZ"],
                    "--out", str(tmp_path)], check=True, capture_output=True)
    for length in (256, 512):
        assert (tmp_path / f"poems-cn-{length}.jsonl").read_bytes() == FROZEN[length].read_bytes()


# ---------------------------------------------------------------- loaders, filters, sampling

def test_prompt_text():
    poem = Poem("宋代", "李弥逊", "题大儒翁小阁", "...")
    assert prompt_text(poem, "cn") == "Dictation: Dynasty: 宋代 Author: 李弥逊 Title: 题大儒翁小阁"
    assert prompt_text(Poem("", "Michael Ryan", "Larkinesque", "..."), "en") == "Dictation: Author: Michael Ryan Title: Larkinesque"
    with pytest.raises(ValueError, match="'cn' or 'en'"):
        prompt_text(poem, "fr")


def write(path: Path, rows: list[dict]):
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        import pandas as pd
        pd.DataFrame(rows).to_csv(path, index=False)
    return path


ALIAS_SETS = [("author", "title", "content"), ("poet", "poem_title", "text"), ("Author", "name", "poem"),
              ("poet", "title", "lines")]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".json", ".csv"])
@pytest.mark.parametrize("names", ALIAS_SETS, ids=lambda names: "-".join(names))
def test_loaders_accept_every_alias(tmp_path, suffix, names):
    rows = jsonl_rows(EN_FIXTURE)
    as_lines = names[2] == "lines" and suffix != ".csv"       # a list column, joined with "\n"
    renamed = [{names[0]: r["author"], names[1]: r["title"],
                names[2]: r["content"].split("\n") if as_lines else r["content"], "extra": 1} for r in rows]
    path = write(tmp_path / f"poems{suffix}", renamed)
    expected = [Poem("", r["author"], r["title"], r["content"]) for r in rows]
    for length, (lo, hi) in ((256, (0, 256)), (512, (256, 512))):
        assert load_poems("en", length, n=None, source=path) == [p for p in expected if lo < poem_chars(p, "en") <= hi]


def test_hub_dataset_through_datasets(monkeypatch):
    import datasets
    rows = [{"dynasty": "宋代", **r} for r in jsonl_rows(EN_FIXTURE)]
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: calls.append(name) or datasets.Dataset.from_list(rows))
    poems = load_poems("cn", 512, n=3, source="larryvrh/Chinese-Poems")
    assert calls == ["larryvrh/Chinese-Poems"] and len(poems) == 3 and poems[0].dynasty == "宋代"


def test_seeded_sampling():
    a = load_poems("en", 256, n=6, seed=0, source=EN_FIXTURE)
    assert a == load_poems("en", 256, n=6, seed=0, source=EN_FIXTURE)
    assert a != load_poems("en", 256, n=6, seed=1, source=EN_FIXTURE)
    everything = load_poems("en", 256, n=None, source=EN_FIXTURE)
    assert len(everything) == 14 and all(p in everything for p in a)
    assert a == [p for p in everything if p in a]                 # source order is kept
    assert load_poems("cn", 256, n=50, seed=3) != load_poems("cn", 256, n=50, seed=4)


def test_ambiguous_prompts_and_empty_rows_are_dropped(tmp_path):
    rows = jsonl_rows(EN_FIXTURE)
    clash = dict(rows[0], content="another poem under the same author and title")
    path = write(tmp_path / "p.jsonl", rows + [clash, {"author": "", "title": "x", "content": "y"}])
    poems = load_poems("en", 256, n=None, source=path)
    assert rows[0]["title"] not in {p.title for p in poems} and len(poems) == 13


def test_errors_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="no frozen en poems.*jnb666/poems"):
        load_poems("en")
    with pytest.raises(ValueError, match=r"no title column \(accepted names: title, poem_title, name\)"):
        load_poems("en", source=write(tmp_path / "a.jsonl", [{"author": "a", "body": "b"}]))
    with pytest.raises(ValueError, match="has 14 poems.*fewer than the 2000 asked"):
        load_poems("en", 256, source=EN_FIXTURE)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="could not read .*bad.parquet"):
        load_poems("en", source=tmp_path / "bad.parquet")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_poems("en", source=tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="length must be one of"):
        load_poems("cn", 300)
    with pytest.raises(ValueError, match="holds no records"):
        rows_to_poems([], "x.json")
    rows = [json.dumps(r) for r in jsonl_rows(EN_FIXTURE)[:3]]
    (tmp_path / "poems.jsonl").write_text("\n".join(rows[:2] + ['{"author": "x", "title": '] + rows[2:]) + "\n")
    with pytest.raises(ValueError, match=r"poems.jsonl, line 3: not a JSON object .*fix or remove that line"):
        load_poems("en", source=tmp_path / "poems.jsonl", n=None)


# ---------------------------------------------------------------- tokenizer and examples

def test_tiny_tokenizer(tok):
    assert tok.vocab_size == 4096
    assert [tok.token_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert tok.eos_token_ids == [0]
    texts = [p.content for length in (256, 512) for p in load_poems("cn", length)]
    texts += [prompt_text(Poem(**r), "cn") for r in jsonl_rows(FROZEN[256])]
    texts += [r["content"] for r in jsonl_rows(EN_FIXTURE)] + ["  odd\tspacing\r\n ünïcode ✓ 𠜾 \n\n"]
    assert all(tok.decode(tok.encode(t)) == t for t in texts)


def test_tiny_tokenizer_build_is_deterministic(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "data" / "build_tiny_tokenizer.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (TINY / name).read_bytes()


def test_chat_prompt_equals_transformers(tok):
    for row in jsonl_rows(FROZEN[256])[:5] + jsonl_rows(FROZEN[512])[:5]:
        prompt = prompt_text(Poem(**row), "cn")
        text, ids = transformers_side().chat_template(TINY, [{"role": "user", "content": prompt}])
        assert format_prompt(tok, prompt, "chat") == text
        assert list(encode_examples([Poem(**row)], tok, "cn", "chat")[0].prompt_ids) == ids


def test_examples_plain_and_chat(tok):
    poem = Poem(**jsonl_rows(FROZEN[256])[0])
    plain = encode_examples([poem], tok, "cn", "plain")[0]
    assert tok.decode(plain.prompt_ids) == prompt_text(poem, "cn") + "\n"
    assert plain.target_ids[-1] == tok.eos_token_id == 0
    assert tok.decode(plain.target_ids) == poem.content
    assert plain.input_ids == list(plain.prompt_ids + plain.target_ids)
    assert plain.labels == [IGNORE] * len(plain.prompt_ids) + list(plain.target_ids)
    chat = encode_examples([poem], tok, "cn", "chat")[0]
    assert chat.target_ids[-1] == target_eos_id(tok, "chat") == tok.token_id("<|im_end|>")
    assert chat.target_ids[:-1] == plain.target_ids[:-1]
    assert stop_token_ids(tok, "chat") == [2, 0] and stop_token_ids(tok, "plain") == [0]
    assert target_eos_id(tok, "plain") == 0


def test_default_format(tok):
    assert default_format(tok, chat=True) == "chat"
    assert default_format(tok, chat=False) == "plain"
    assert default_format(tok) == "plain"                   # the tiny-tokenizer folder is no instruct model
    tok_without_template = load_tokenizer("tiny-qwen2")
    tok_without_template.chat_template = None
    assert default_format(tok_without_template, chat=True) == "plain"


def test_target_longer_than_budget(tok):
    poems = load_poems("cn", 512, n=5)
    with pytest.raises(ValueError, match="more than the 64-token budget"):
        encode_examples(poems, tok, "cn", "plain", max_tokens=64)
