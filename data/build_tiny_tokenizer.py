"""Rebuild models/assets/tiny-tokenizer: the byte-level BPE (4,096 tokens) of the tiny model presets.

    python data/build_tiny_tokenizer.py

Trained with `tokenizers` on the prompts and poems of data/poems-cn-{256,512}.jsonl and
tests/fixtures/poems-en.jsonl, with Qwen2's pre-tokenizer regex and no normalizer, so that
decode(encode(text)) == text for any text. Ids 0, 1, 2 are <|endoftext|> (EOS), <|im_start|> and
<|im_end|>; tokenizer_config.json carries Qwen2-Instruct's ChatML chat template. Deterministic:
running it twice writes the same bytes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from engine.data import prompt_text, read_records, rows_to_poems  # noqa: E402

VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SOURCES = [("cn", ROOT / "data" / "poems-cn-256.jsonl"), ("cn", ROOT / "data" / "poems-cn-512.jsonl"),
           ("en", ROOT / "tests" / "fixtures" / "poems-en.jsonl")]


def training_texts() -> list[str]:
    texts = []
    for lang, path in SOURCES:
        for poem in rows_to_poems(read_records(path), str(path)):
            texts += [prompt_text(poem, lang), poem.content]
    return texts


def train() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(training_texts(), trainer)
    if tokenizer.get_vocab_size(with_added_tokens=True) != VOCAB_SIZE:
        raise SystemExit(f"trained {tokenizer.get_vocab_size()} tokens, not {VOCAB_SIZE}: the corpus is too small")
    return tokenizer


def tokenizer_config() -> dict:
    added = {str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i, token in enumerate(SPECIAL_TOKENS)}
    return {"added_tokens_decoder": added, "additional_special_tokens": SPECIAL_TOKENS[1:], "bos_token": None,
            "chat_template": QWEN2_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
            "eos_token": "<|endoftext|>", "errors": "replace", "model_max_length": 1024,
            "pad_token": "<|endoftext|>", "split_special_tokens": False,
            "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "assets" / "tiny-tokenizer")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = train()
    tokenizer.save(str(args.out / "tokenizer.json"), pretty=True)
    (args.out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(), ensure_ascii=False, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {tokenizer.get_vocab_size()} tokens")


if __name__ == "__main__":
    main()
