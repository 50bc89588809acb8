"""Recitation metrics on hand-made CN and EN cases, and the evaluator end to end on a tiny model."""
import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models

import engine.evaluate as ev
from engine.data import Poem
from engine.evaluate import classify, edit_distance, evaluate, levenshtein, run_eval, summarize
from engine.stats import wilson_interval
from models.tokenizer import Tokenizer

CN = "青鞋踏尽剑铓山，借枕僧房落照间。\n高屋凭虚听泉语，岭云应似我身闲。"
CN_OTHER = "野寺寻春花已迟，背岩惟有两三枝。\n明朝携酒犹堪醉，为报春风且莫吹。"
EN = "Hope is the thing with feathers\nThat perches in the soul,\nAnd sings the tune without the words,\nAnd never stops at all,"
EN_OTHER = "I'm Nobody! Who are you?\nAre you - Nobody - too?\nThen there's a pair of us!\nDon't tell! they'd advertise - you know!"
FIXTURE = Path(__file__).parent / "fixtures" / "poems-en.jsonl"


def dp_levenshtein(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def test_levenshtein_matches_dynamic_programming():
    rng = random.Random(0)
    for _ in range(300):
        a, b = ("".join(rng.choice("ab春风 ") for _ in range(rng.randint(0, 70))) for _ in range(2))
        assert levenshtein(a, b) == dp_levenshtein(a, b)
    assert levenshtein("kitten", "sitting") == 3 and edit_distance("", "") == 0.0 and edit_distance("", "ab") == 1.0


@pytest.mark.parametrize("poem,other", [(CN, CN_OTHER), (EN, EN_OTHER)], ids=["cn", "en"])
def test_categories(poem, other):
    half = len(poem) // 2
    assert classify(poem, poem) == ("correct", 0.0)
    assert classify(poem + "\n", poem)[0] == "correct"                     # the one normalization
    assert classify(" " + poem + " \n ", poem)[0] == "correct"
    assert classify(poem[:5] + "X" + poem[6:], poem)[0] == "minor"         # one character wrong
    assert classify(poem[:-1], poem)[0] == "minor"                         # one character missing
    assert classify(poem.replace("\n", ""), poem)[0] == "minor"            # line breaks lost: wrong, but minor
    assert classify(poem[:half] + other[half:], poem)[0] == "severe"       # half the poem wrong
    assert classify(other, poem)[0] == "memory_loss"                       # another poem entirely
    assert classify("", poem) == ("memory_loss", 1.0)
    assert classify("I do not know.", poem)[0] == "memory_loss"
    assert classify("I don't know", poem)[0] == "memory_loss"
    assert classify("我不知道。", poem)[0] == "memory_loss"
    assert classify("".join(c if i % 2 == 0 else "某" for i, c in enumerate(poem)), poem)[0] == "severe"


def test_refusal_words_inside_the_poem_are_not_a_refusal():
    poem = "不知道何处，春风又一年。"
    assert classify("不知道。", poem)[0] != "correct"
    assert classify("不知道何处，春风又一年", poem)[0] == "minor"


def record(target, category):
    return {"target": target, "correct": category == "correct", "category": category, "edit_distance": 0.0}


def test_summary_and_length_buckets():
    records = [record("a" * 20, "correct"), record("b" * 40, "minor"), record("c" * 60, "correct"),
               record("d" * 120, "severe"), record("e" * 130, "correct"), record("f" * 450, "memory_loss")]
    s = summarize(records)
    assert s["n"] == 6 and s["correct"] == 3 and s["accuracy"] == 0.5
    assert s["categories"] == {"correct": 3, "minor": 1, "severe": 1, "memory_loss": 1}
    assert [(b["chars"], b["n"], b["correct"], b["accuracy"]) for b in s["by_length"]] == [
        ("1-50", 2, 1, 0.5), ("51-100", 1, 1, 1.0), ("101-150", 2, 1, 0.5), (">400", 1, 0, 0.0)]
    assert s["interval"] == list(wilson_interval(3, 6)) and s["by_length"][3]["interval"] == list(wilson_interval(0, 1))
    assert summarize([])["interval"] is None


def char_tokenizer(texts, directory=None) -> Tokenizer:
    """One token per character plus </s>, decoded by concatenation (no BPE merges)."""
    chars = sorted(set("".join(texts)) | set("Dictation: AuthorTitleDynasty\n"))
    vocab = {"</s>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    backend = Backend(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(["</s>"])
    if directory is not None:
        backend.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return Tokenizer(backend, [0], None, {"eos_token": "</s>"})


def poems():
    rows = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()[:4]]
    return [Poem("", r["author"], r["title"], r["content"]) for r in rows]


def test_evaluate_scores_what_the_generator_returns(monkeypatch):
    """A stub generator that recites poem 0 exactly, poem 1 with a trailing newline and a wrong
    character, poem 2 as "I do not know" and poem 3 as poem 0."""
    ps = poems()
    tok = char_tokenizer([f"{p.content}{p.author}{p.title}" for p in ps] + ["I do not know?"])
    replies = [ps[0].content, ps[1].content[:3] + "?" + ps[1].content[4:] + "\n", "I do not know", ps[0].content]
    seen = {}

    def fake_generate(model, prompts, caps, eos, stats, **kwargs):
        seen.update(prompts=prompts, caps=caps, eos=eos)
        stats.update(batches=1, steps=7, prefill_tokens=sum(map(len, prompts)), generated_tokens=42)
        return [tok.encode(r) for r in replies]

    monkeypatch.setattr(ev, "greedy_generate", fake_generate)
    summary, records = evaluate(None, tok, ps, "en", margin=5)
    assert [r["category"] for r in records] == ["correct", "minor", "memory_loss", "memory_loss"]
    assert summary["accuracy"] == 0.25 and summary["generated_tokens"] == 42 and summary["format"] == "plain"
    assert seen["eos"] == [0]
    assert seen["caps"] == [len(p.content) + 1 + 5 for p in ps]                    # target + EOS + margin
    assert tok.decode(seen["prompts"][0]) == f"Dictation: Author: {ps[0].author} Title: {ps[0].title}\n"
    assert records[0]["prompt"] == f"Dictation: Author: {ps[0].author} Title: {ps[0].title}"
    assert records[1]["output"] == replies[1].strip()


def test_run_eval_end_to_end(tmp_path, one_thread):
    """A random tiny model: nothing recited, but every field and file is there and consistent."""
    from models import build_model
    from models.config import ModelConfig
    ps = poems()
    tok = char_tokenizer([f"{p.content}{p.author}{p.title}" for p in ps], tmp_path)
    config = ModelConfig.from_dict({"model_type": "qwen2", "vocab_size": tok.vocab_size, "hidden_size": 32,
                                    "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                                    "num_key_value_heads": 1, "tie_word_embeddings": True, "eos_token_id": 0})
    build_model(config, seed=0).save_pretrained(tmp_path)
    results = run_eval(tmp_path, tmp_path / "out", device="cpu", lang="en", length=256, poems=3, source=FIXTURE, margin=2)
    assert results["n"] == 3 and sum(results["categories"].values()) == 3 and 0 <= results["accuracy"] <= 1
    for key in ("eval_seconds", "generated_tokens", "tokens_per_second", "by_length", "mean_edit_distance"):
        assert key in results
    lines = (tmp_path / "out" / "generations.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["prompt"].startswith("Dictation: Author: ")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["n"] == 3
    assert results["generated_tokens"] <= sum(json.loads(line)["target_tokens"] + 1 + 2 for line in lines)
