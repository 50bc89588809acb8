"""Recitation accuracy and error classes, as the paper defines them.

Accuracy (the paper's Acc = sum 1[pred_i = true_i] / N): a poem counts only when the decoded
greedy output equals the poem exactly. The one normalization: whitespace at both ends of the
output is stripped (`str.strip`), because the reference poem is itself stored stripped
(engine/data.py) and a space or newline before EOS carries no poem content; every character
inside, line breaks and punctuation included, must match.

Wrong answers are sorted into the paper's classes with d = Levenshtein(output, poem) /
max(len(output), len(poem)) on the stripped strings (0 = equal, 1 = nothing in common):
  correct      output == poem;
  minor        d <= MINOR_MAX (0.1: a character or two per line wrong, missing or extra);
  memory_loss  the model does not recall the poem: an empty output; a refusal ("I do not know",
               "不知道", ...: see is_refusal); or an output sharing almost nothing with the poem,
               such as another poem in the right style (the paper's Figure 3): fewer than
               LOSS_OVERLAP (10%) of the poem's bigrams appear in it (bigrams of CJK characters
               or of words, so the letters any two English texts share do not count) and
               d > LOSS_MIN_DISTANCE (0.5, so a recitation with at least every other character
               right stays a distortion). Measured on pairs of different poems: CN
               (data/poems-cn-256.jsonl) bigram overlap 0.1% on average, at most 4%, d >= 0.74;
               EN (tests/fixtures) at most 4%, d >= 0.67: all memory loss;
  severe       everything else: the poem is recognizably there but badly distorted.
The paper's output-length effect is reported as accuracy per bucket of poem characters.
"""
from __future__ import annotations

import contextlib
import json
import re
import time
from collections import Counter
from pathlib import Path

import torch

from engine.data import (Poem, default_format, encode_examples, fingerprint, load_poems, model_format, prompt_text,
                         stop_token_ids)
from engine.generate import greedy_generate
from engine.runs import TRAINING_FILE, check_eval_output, claimed, is_run_folder, write_json, write_text
from engine.stats import wilson_interval
from models import load_model, load_tokenizer

CATEGORIES = ("correct", "minor", "severe", "memory_loss")
MINOR_MAX = 0.1
LOSS_OVERLAP = 0.1
LOSS_MIN_DISTANCE = 0.5
REFUSAL_MAX_CHARS = 64          # a refusal is a short answer, not a poem that happens to say 不知道
REFUSALS = ("idonotknow", "idontknow", "idonotremember", "idontremember", "icannotrecall", "icantrecall",
            "imnotsure", "iamnotsure", "notfamiliar", "不知道", "不清楚", "不记得", "想不起", "无法回答", "抱歉")
LENGTH_EDGES = (50, 100, 150, 200, 300, 400)      # poem characters: 1-50, 51-100, ..., >400
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_UNITS = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")


def normalize(text: str) -> str:
    return text.strip()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions) by Myers' bit-parallel algorithm
    (Hyyrö's formulation): one pass over b with len(a)-bit integers, ~100x a Python DP."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    mask, top = (1 << len(a)) - 1, 1 << (len(a) - 1)
    peq: dict[str, int] = {}
    for i, ch in enumerate(a):
        peq[ch] = peq.get(ch, 0) | (1 << i)
    pv, mv, score = mask, 0, len(a)
    for ch in b:
        eq = peq.get(ch, 0)
        xv = eq | mv
        xh = ((((eq & pv) + pv) & mask) ^ pv) | eq
        ph = mv | (~(xh | pv) & mask)
        mh = pv & xh
        score += 1 if ph & top else -1 if mh & top else 0
        ph = ((ph << 1) | 1) & mask
        mh = (mh << 1) & mask
        pv = mh | (~(xv | ph) & mask)
        mv = ph & xv
    return score


def edit_distance(output: str, target: str) -> float:
    """Levenshtein / max(len): 0 for equal strings, 1 when nothing lines up."""
    longest = max(len(output), len(target))
    return levenshtein(output, target) / longest if longest else 0.0


def bigram_overlap(output: str, target: str) -> float:
    """Share of the target's bigrams (CJK characters or words, case-folded) found in the output."""
    def grams(text):
        units = _UNITS.findall(text.lower())
        return Counter(zip(units, units[1:])) if len(units) > 1 else Counter(units)
    want = grams(target)
    return sum((want & grams(output)).values()) / sum(want.values()) if want else 1.0


def is_refusal(output: str, target: str) -> bool:
    """A short answer saying the model does not know (letters and CJK only, so "I don't know."
    and "I do not know" both match), unless the poem itself says so."""
    squeeze = lambda text: "".join(ch for ch in text.lower() if ch.isalnum())   # noqa: E731
    out, poem = squeeze(output), squeeze(target)
    return len(out) <= REFUSAL_MAX_CHARS and any(r in out and r not in poem for r in REFUSALS)


def classify(output: str, target: str) -> tuple[str, float]:
    """(category, normalized edit distance) of one output against its poem (see the module docstring)."""
    output, target = normalize(output), normalize(target)
    distance = edit_distance(output, target)
    if output == target:
        return "correct", distance
    if distance <= MINOR_MAX:
        return "minor", distance
    if not output or is_refusal(output, target):
        return "memory_loss", distance
    if bigram_overlap(output, target) < LOSS_OVERLAP and distance > LOSS_MIN_DISTANCE:
        return "memory_loss", distance
    return "severe", distance


def length_bucket(chars: int) -> str:
    lo = 0
    for hi in LENGTH_EDGES:
        if chars <= hi:
            return f"{lo + 1}-{hi}"
        lo = hi
    return f">{lo}"


def summarize(records: list[dict]) -> dict:
    """Accuracy (a fraction) with its 95% Wilson interval, counts per category, mean edit distance,
    accuracy and interval per length bucket."""
    buckets: dict[str, list[dict]] = {}
    for r in sorted(records, key=lambda r: len(r["target"])):
        buckets.setdefault(length_bucket(len(r["target"])), []).append(r)
    return {
        **_accuracy(records),
        "categories": {c: sum(r["category"] == c for r in records) for c in CATEGORIES},
        "mean_edit_distance": sum(r["edit_distance"] for r in records) / len(records) if records else 0.0,
        "by_length": [{"chars": name, **_accuracy(rs)} for name, rs in buckets.items()],
    }


def _accuracy(records: list[dict]) -> dict:
    """n, correct, accuracy and its 95% Wilson interval (None for no records)."""
    n, correct = len(records), sum(r["correct"] for r in records)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0,
            "interval": list(wilson_interval(correct, n)) if n else None}


def evaluate(model, tokenizer, poems: list[Poem], lang: str, fmt: str | None = None, margin: int = 16,
             **generate_kwargs) -> tuple[dict, list[dict]]:
    """Recite every poem greedily from its prompt -> (summary, one record per poem).

    Prompts and targets come from engine/data.py's tokenization path; each poem may generate
    its target's token count (EOS included) + `margin` tokens, so a recitation that runs on
    past the poem is seen as wrong rather than cut to look right.
    """
    fmt = fmt or default_format(tokenizer)
    examples = encode_examples(poems, tokenizer, lang, fmt)
    caps = [len(e.target_ids) + margin for e in examples]
    stats: dict = {}
    start = time.perf_counter()
    outputs = greedy_generate(model, [list(e.prompt_ids) for e in examples], caps, stop_token_ids(tokenizer, fmt),
                              stats=stats, **generate_kwargs)
    seconds = time.perf_counter() - start
    records = []
    for poem, example, ids in zip(poems, examples, outputs):
        text = tokenizer.decode(ids)
        category, distance = classify(text, poem.content)
        records.append({"prompt": prompt_text(poem, lang), "target": poem.content, "output": normalize(text),
                        "correct": category == "correct", "category": category,
                        "edit_distance": round(distance, 4), "target_tokens": len(example.target_ids) - 1,
                        "output_tokens": len(ids)})
    summary = {**summarize(records), "format": fmt, "eval_seconds": seconds,
               "prompt_tokens": stats["prefill_tokens"], "generated_tokens": stats["generated_tokens"],
               "tokens_per_second": stats["generated_tokens"] / seconds if seconds else 0.0,
               "decode_batches": stats["batches"], "decode_steps": stats["steps"]}
    return summary, records


def resolve_device(device: str | None) -> str:
    """The device to run on (None: cuda when available), checked before any model is loaded."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if kind.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: the engine runs on cpu or cuda")
    if kind.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA GPU on this machine: use --device cpu (or install "
                         "a CUDA build of torch)")
    if kind.type == "cuda" and kind.index is not None and kind.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    return device


EVAL_SETTINGS = ("format", "lang", "length", "poems", "seed", "source")
EVAL_DEFAULTS = {"lang": "cn", "length": 256, "poems": 2000, "seed": 0, "source": None, "format": None}


def eval_model(target) -> Path | str:
    """What `cli.py eval` loads: a run folder means its final model/ (a registry name or a model folder
    is itself)."""
    if is_run_folder(target):
        model = Path(target) / "model"
        if not (model / "config.json").is_file():
            raise ValueError(f"{target} is a run that has not finished (no model/ yet): evaluate one of its "
                             f"checkpoints with --model {target}/checkpoint-N/model, or finish it with --resume")
        return model
    return target


def trained_settings(model) -> tuple[dict, str | None]:
    """The settings a model folder was trained with (its training.json, else its run folder's config.json)
    and where they came from; ({}, None) for anything else."""
    folder = Path(str(model))
    for path in (folder / TRAINING_FILE, folder.parent / "config.json"):
        if path.is_file() and (path.name == TRAINING_FILE or is_run_folder(folder.parent)):
            try:
                return json.loads(path.read_text(encoding="utf-8")), str(path)
            except ValueError as e:
                raise ValueError(f"{path} is not valid JSON ({e}): pass every setting as a flag instead") from None
    return {}, None


def eval_settings(trained: dict, where: str | None, given: dict) -> tuple[dict, list[str]]:
    """Each setting from the flag when given, else the run's (trained_settings), else EVAL_DEFAULTS; with the
    lines that say so: an evaluation of a trained run follows the run unless told otherwise."""
    settings, lines = {}, []
    for name in EVAL_SETTINGS:
        run_value = trained.get(name)
        if given.get(name) is not None:
            settings[name] = given[name]
            if where and run_value is not None and given[name] != run_value:
                lines.append(f"--{name} {given[name]} instead of the run's {run_value}")
        else:
            settings[name] = run_value if where and name in trained else EVAL_DEFAULTS[name]
    if where:
        used = ", ".join(f"{name} {trained[name]}" for name in EVAL_SETTINGS
                         if name in trained and given.get(name) is None)
        lines.insert(0, f"the run's settings ({where}): {used or 'none'}")
    return settings, lines


def run_eval(model_name_or_path, out_dir=None, device=None, dtype=None, margin: int = 16, overwrite: bool = False,
             say=print, **given) -> dict:
    """`cli.py eval`: the model (a run folder: its final model/) with the run's format and poems unless a
    flag says otherwise (given: format, lang, length, poems, seed, source), recited and scored; under
    out_dir (locked, new or its own earlier evaluation with overwrite) generations.jsonl and results.json."""
    model_path = eval_model(model_name_or_path)
    trained, where = trained_settings(model_path)
    settings, lines = eval_settings(trained, where, given)
    out = Path(out_dir) if out_dir is not None else None
    device = resolve_device(device)
    check = lambda folder: check_eval_output(folder, overwrite)  # noqa: E731
    with claimed(out, check) if out is not None else contextlib.nullcontext():
        for line in lines:
            say(f"eval: {line}")
        tokenizer = load_tokenizer(model_path)
        fmt = settings["format"] or model_format(model_path, tokenizer)
        poems = load_poems(settings["lang"], settings["length"], settings["poems"], settings["seed"], settings["source"])
        poems_sha256 = fingerprint(poems)
        if trained.get("poems_sha256") not in (None, poems_sha256) and all(given.get(k) is None
                                                                            for k in ("poems", "seed", "source")):
            say("eval: warning: these poems differ from the ones the run trained on (their source changed since)")
        model = load_model(model_path, device=device, dtype=dtype)
        say(f"eval: reciting {len(poems)} {settings['lang']}-{settings['length']} poems ({fmt} format) with "
            f"{model_path} on {device}")
        summary, records = evaluate(model, tokenizer, poems, settings["lang"], fmt, margin)
        results = {"command": "eval", "model": str(model_path), "lang": settings["lang"], "length": settings["length"],
                   "n_poems": len(poems), "seed": settings["seed"],
                   "source": None if settings["source"] is None else str(settings["source"]),
                   "poems_sha256": poems_sha256, "device": str(device), "dtype": str(model.dtype), **summary}
        if out is not None:
            write_results(out, results, records)
    return results


def write_results(out_dir, results: dict, records: list[dict]) -> None:
    """generations.jsonl (one record per poem, UTF-8, not escaped) and results.json, each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "generations.jsonl", "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    write_json(out / "results.json", results)
