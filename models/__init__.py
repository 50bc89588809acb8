"""Model definitions (Qwen2 family, BLOOM), configs, the registry and checkpoint I/O."""
from models.registry import PAPER_MODELS, REGISTRY, TINY_TOKENIZER, resolve
from models.tokenizer import Tokenizer, read_tokenizer_dir


def load_tokenizer(name_or_path) -> Tokenizer:
    """The tokenizer of a model folder, a registry name, or the shipped tiny tokenizer for presets."""
    directory, _ = resolve(name_or_path)
    return read_tokenizer_dir(directory if directory is not None else TINY_TOKENIZER)


__all__ = ["PAPER_MODELS", "REGISTRY", "Tokenizer", "load_tokenizer", "resolve"]
