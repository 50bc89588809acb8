"""The checkpoint's tokenizer, read from tokenizer.json, with what the engine needs beside it."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import tokenizers

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def _token_text(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


@dataclass
class Tokenizer:
    """A `tokenizers.Tokenizer` plus the EOS ids and the chat template of its checkpoint."""

    backend: tokenizers.Tokenizer
    eos_token_ids: list[int]
    chat_template: str | None
    special_tokens: dict[str, str]
    source_dir: Path | None = None

    @property
    def eos_token_id(self) -> int:
        return self.eos_token_ids[0]

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def save(self, out_dir) -> None:
        """Copy the tokenizer files next to a saved model."""
        if self.source_dir is None:
            self.backend.save(str(Path(out_dir) / "tokenizer.json"))
            return
        for name in TOKENIZER_FILES:
            if (self.source_dir / name).is_file():
                shutil.copyfile(self.source_dir / name, Path(out_dir) / name)


def read_tokenizer_dir(directory) -> Tokenizer:
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {directory}: the engine reads the fast-tokenizer file "
                                "that Hugging Face checkpoints ship; copy it there from the model's repository")
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:
        raise ValueError(f"{path} is not a valid tokenizers file ({e}); download it again") from None
    config = _read_json(directory / "tokenizer_config.json")
    special = {key: _token_text(config[key]) for key in ("eos_token", "bos_token", "pad_token", "unk_token")
               if _token_text(config.get(key))}
    eos = [backend.token_to_id(special["eos_token"])] if "eos_token" in special else []
    generation = _read_json(directory / "generation_config.json").get("eos_token_id")
    model_eos = _read_json(directory / "config.json").get("eos_token_id")
    for extra in (generation, model_eos):
        for token_id in extra if isinstance(extra, list) else [extra]:
            if token_id is not None and token_id not in eos:
                eos.append(token_id)
    eos = [i for i in eos if i is not None]
    if not eos:
        raise ValueError(f"{directory}: no EOS token found in tokenizer_config.json, generation_config.json "
                         "or config.json; add eos_token to tokenizer_config.json")
    return Tokenizer(backend, eos, config.get("chat_template"), special, directory)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
