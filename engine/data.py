"""Poems -> prompt and target text -> token ids: the one tokenization path of training and evaluation.

A poem's prompt is the paper's `Dictation: ...` line; its target is the poem followed by the EOS
token. Chat/instruct checkpoints see the prompt inside their chat template (rendered with jinja2
exactly as transformers' `apply_chat_template(..., add_generation_prompt=True)` does), other
models see `prompt + "\\n"`. The evaluator generates from `Example.prompt_ids` and compares the
decoded output with `Poem.content`.
"""
from __future__ import annotations

import csv
import functools
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from engine.runs import parse_jsonl
from models.registry import REGISTRY

FROZEN = Path(__file__).resolve().parent.parent / "data"
HUB_DATASETS = {"cn": "larryvrh/Chinese-Poems", "en": "jnb666/poems"}
# Accepted column names, first match wins (case-insensitive); `lines` may hold a list of lines.
ALIASES = {"author": ("author", "poet"), "title": ("title", "poem_title", "name"),
           "content": ("content", "text", "poem", "lines"), "dynasty": ("dynasty",)}
LENGTH_BINS = {256: (0, 256), 512: (256, 512)}   # prompt + content characters: lo < len <= hi
DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")
IGNORE = -100


@dataclass(frozen=True)
class Poem:
    dynasty: str        # "" for English poems
    author: str
    title: str
    content: str


def prompt_text(poem: Poem, lang: str) -> str:
    if lang == "cn":
        return f"Dictation: Dynasty: {poem.dynasty} Author: {poem.author} Title: {poem.title}"
    if lang == "en":
        return f"Dictation: Author: {poem.author} Title: {poem.title}"
    raise ValueError(f"unknown language {lang!r}: use 'cn' or 'en'")


def poem_chars(poem: Poem, lang: str) -> int:
    """The paper's selection length: characters of the prompt plus the poem."""
    return len(prompt_text(poem, lang)) + len(poem.content)


# ---------------------------------------------------------------- selection

def unique_prompts(poems: list[Poem], lang: str) -> list[Poem]:
    """Drop every poem whose prompt names more than one record: it could not be recited exactly."""
    counts = Counter(prompt_text(p, lang) for p in poems)
    return [p for p in poems if counts[prompt_text(p, lang)] == 1]


def length_bounds(length: int) -> tuple[int, int]:
    if length not in LENGTH_BINS:
        raise ValueError(f"length must be one of {sorted(LENGTH_BINS)} (characters of prompt + poem), got {length}")
    return LENGTH_BINS[length]


def select(poems: list[Poem], lang: str, length: int, n: int | None, seed: int, where: str = "the source") -> list[Poem]:
    """Unique prompts in the length bin, then a seeded sample of n kept in source order (None: all)."""
    lo, hi = length_bounds(length)
    pool = [p for p in unique_prompts(poems, lang) if lo < poem_chars(p, lang) <= hi]
    if n is None:
        return pool
    if len(pool) < n:
        raise ValueError(f"{where} has {len(pool)} poems with {lo} < prompt + poem characters <= {hi} and a unique "
                         f"prompt, fewer than the {n} asked for: lower --poems or pass a larger --source")
    keep = sorted(random.Random(seed).sample(range(len(pool)), n))
    return [pool[i] for i in keep]


def fingerprint(poems: list[Poem]) -> str:
    """sha256 of the poems' content, in order: the same poems from any file, path or copy give the same
    fingerprint, and a changed poem gives another (what a resume and a report check, not the path)."""
    import hashlib
    rows = [[p.dynasty, p.author, p.title, p.content] for p in poems]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def local_path(source) -> bool:
    """Does `source` name a local file rather than a Hugging Face dataset (owner/name)? Anything that
    exists, starts with . / ~, or ends in a data file's suffix is a path: a mistyped path is then
    "no such file", not a hub lookup."""
    text = str(source)
    return (Path(text).expanduser().exists() or text.startswith((".", "/", "~"))
            or Path(text).suffix.lower() in DATA_SUFFIXES or text.count("/") != 1)


def load_poems(lang: str = "cn", length: int = 256, n: int | None = 2000, seed: int = 0, source=None) -> list[Poem]:
    """Poems of the length bin `length` (256: <= 256 characters, 512: 257..512), n of them sampled with `seed`.

    source: None (the frozen CN files in data/), a local .parquet/.jsonl/.json/.csv file, or a
    Hugging Face dataset name such as larryvrh/Chinese-Poems or jnb666/poems.
    """
    prompt_text(Poem("", "", "", ""), lang), length_bounds(length)     # validate before reading anything
    if source is None:
        if lang != "cn":
            raise ValueError(f"no frozen {lang} poems ship with the engine: pass --source with a local file "
                             f"(.parquet/.jsonl/.json/.csv with author, title, content) or the dataset {HUB_DATASETS[lang]}")
        source = FROZEN / f"poems-cn-{length}.jsonl"
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing: regenerate it with data/build_cn.py (see data/README.md)")
    path = Path(source).expanduser()
    if not local_path(source):
        rows, where = _hub_records(str(source)), str(source)
    elif path.is_file():
        rows, where = read_records(path), str(path)
    else:
        raise FileNotFoundError(f"--source {source}: no such file (a Hugging Face dataset is named owner/name, "
                                "without a suffix)")
    return select(rows_to_poems(rows, where), lang, length, n, seed, where)


def read_records(path: Path) -> list[dict]:
    """Rows of a local .parquet, .jsonl (an object a line), .json (a list of objects) or .csv file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq
            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8-sig")        # a byte-order mark would hide the first column's name
        if suffix == ".json":
            data = json.loads(text)
            return data if isinstance(data, list) else data.get("data", data.get("train"))
        if suffix == ".csv":
            return list(csv.DictReader(text.splitlines(keepends=True)))
    except Exception as e:
        expected = "it is a UTF-8 text file" if suffix == ".jsonl" else f"the file is a valid {suffix[1:]} file"
        raise ValueError(f"could not read {path} ({type(e).__name__}: {e}); check that {expected}") from None
    if suffix != ".jsonl":
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use {', '.join(DATA_SUFFIXES)}")
    return parse_jsonl(text, path, "object", "fix or remove that line")


def _hub_records(name: str) -> list[dict]:
    try:
        import datasets
        return datasets.load_dataset(name, split="train").to_list()
    except Exception as e:
        raise FileNotFoundError(
            f"the dataset {name} is not in the Hugging Face cache and could not be downloaded ({type(e).__name__}).\n"
            f"  online:  hf download --repo-type dataset {name}\n"
            f"  offline: export it to a .parquet/.jsonl/.csv file and pass that path instead") from None


def rows_to_poems(rows, where: str) -> list[Poem]:
    """Map columns by alias; rows with an empty author, title or content are skipped."""
    if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
        raise ValueError(f"{where} holds no records: expected rows with author, title and content columns")
    names = {key.lower(): key for key in rows[0]}
    columns = {}
    for field, aliases in ALIASES.items():
        found = next((names[a] for a in aliases if a in names), None)
        if found is None and field != "dynasty":
            raise ValueError(f"{where} has no {field} column (accepted names: {', '.join(aliases)}); "
                             f"its columns are: {', '.join(rows[0])}")
        columns[field] = found
    poems = []
    for number, row in enumerate(rows, 1):
        values = {field: _text(row.get(column), where, number, column) if column else ""
                  for field, column in columns.items()}
        if values["author"] and values["title"] and values["content"]:
            poems.append(Poem(**values))
    return poems


def _text(value, where: str, row: int, column: str) -> str:
    """A field's text: a string, or a list of strings (lines); anything else is refused, naming the row
    (stringified, a number or a dict would become the target the model is trained to recite)."""
    if value is None:
        return ""
    lines = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(line, str) for line in lines):
        raise ValueError(f"{where}, row {row}: {column} is {type(value).__name__} {str(value)[:60]!r}, not text: "
                         "fix that row or remove it")
    return "\n".join(lines).strip()


# ---------------------------------------------------------------- token ids

@dataclass(frozen=True)
class Example:
    """One training/evaluation sequence: the prompt to generate from and the target ending with EOS."""

    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)

    @property
    def input_ids(self) -> list[int]:
        return [*self.prompt_ids, *self.target_ids]

    @property
    def labels(self) -> list[int]:
        """Aligned with input_ids (not shifted): -100 on the prompt, the target ids after it."""
        return [IGNORE] * len(self.prompt_ids) + list(self.target_ids)


def default_format(tokenizer, chat: bool | None = None) -> str:
    """'chat' for chat/instruct models whose tokenizer has a chat template, else 'plain'.

    chat: the registry's ModelSpec.chat; None guesses from the checkpoint folder's name.
    """
    if chat is None:
        name = str(getattr(tokenizer, "source_dir", "") or "").lower()
        chat = "chat" in name or "instruct" in name
    return "chat" if chat and tokenizer.chat_template else "plain"


def model_format(model_name_or_path, tokenizer) -> str:
    """default_format with the registry's chat flag for a registry name (a folder: guessed)."""
    spec = REGISTRY.get(str(model_name_or_path))
    return default_format(tokenizer, spec.chat if spec else None)


@functools.lru_cache(maxsize=8)
def _compiled_template(template: str):
    # The same environment as transformers.utils.chat_template_utils._compile_jinja_template.
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    if not tokenizer.chat_template:
        raise ValueError("this tokenizer has no chat_template in tokenizer_config.json: use the 'plain' format")
    return _compiled_template(tokenizer.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **tokenizer.special_tokens)


def format_prompt(tokenizer, text: str, fmt: str) -> str:
    if fmt == "chat":
        return render_chat(tokenizer, [{"role": "user", "content": text}])
    if fmt == "plain":
        return text + "\n"
    raise ValueError(f"unknown prompt format {fmt!r}: use 'chat' or 'plain'")


def target_eos_id(tokenizer, fmt: str) -> int:
    """The token that ends a target: the token closing an assistant turn in chat (Qwen: <|im_end|>), else EOS."""
    if fmt == "chat":
        marker = "\uE000poem\uE000"
        chat = render_chat(tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker},
                                       {"role": "user", "content": "q"}], add_generation_prompt=False)
        ids = tokenizer.encode(chat.split(marker, 1)[1])
        if ids and ids[0] in tokenizer.backend.get_added_tokens_decoder():
            return ids[0]
    return tokenizer.eos_token_id


def stop_token_ids(tokenizer, fmt: str) -> list[int]:
    """What generation stops at: the target's end token first, then the checkpoint's EOS ids."""
    first = target_eos_id(tokenizer, fmt)
    return [first] + [i for i in tokenizer.eos_token_ids if i != first]


def special_texts(tokenizer) -> list[str]:
    """The texts of the tokenizer's special tokens (<|endoftext|>, <|im_end|>, ...)."""
    return [token.content for token in tokenizer.backend.get_added_tokens_decoder().values() if token.special]


def encode_examples(poems: list[Poem], tokenizer, lang: str, fmt: str, max_tokens: int | None = None) -> list[Example]:
    """A poem holding a special token's text is refused: it would encode as that token (an EOS inside the
    target), and such a poem could never be recited."""
    eos = target_eos_id(tokenizer, fmt)
    specials = special_texts(tokenizer)
    examples = []
    for poem in poems:
        found = next((text for text in specials for field in (poem.author, poem.title, poem.content, poem.dynasty)
                      if text in field), None)
        if found:
            raise ValueError(f"{poem.title!r} by {poem.author} holds the text of the special token {found}: it would "
                             "be read as that token and the poem could never be recited; remove it from the source")
        example = Example(tuple(tokenizer.encode(format_prompt(tokenizer, prompt_text(poem, lang), fmt))),
                          tuple(tokenizer.encode(poem.content)) + (eos,))
        if max_tokens is not None and len(example) > max_tokens:
            raise ValueError(f"{poem.title!r} by {poem.author} is {len(example)} tokens (prompt "
                             f"{len(example.prompt_ids)} + target {len(example.target_ids)}), more than the "
                             f"{max_tokens}-token budget: raise the token budget or select shorter poems")
        examples.append(example)
    return examples
