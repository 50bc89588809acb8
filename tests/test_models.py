"""Our Qwen2 and BLOOM models against transformers on random checkpoints that transformers wrote."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import CheckpointError, KVCache, load_model, load_tokenizer
from models.bloom import alibi_slopes
from models.config import ModelConfig
from tests.helpers import packed, transformers_side

LENGTHS = [5, 1, 17, 9]

SHAPES = {
    "qwen2-gqa14-2-d64": ("qwen2", 14, 2, 64, {}),
    "qwen2-gqa12-2-d128-untied": ("qwen2", 12, 2, 128, {"tied": False}),
    "qwen2-mha16-d64": ("qwen2", 16, 16, 64, {"tied": False}),
    "bloom-16h-d64": ("bloom", 16, 16, 64, {}),
    "bloom-12h-d16": ("bloom", 12, 12, 16, {}),
    "bloom-post-ln-residual": ("bloom", 4, 4, 16, {"apply_residual_connection_post_layernorm": True}),
}


def hf_logits(directory):
    """transformers' logits of each LENGTHS sequence alone from the checkpoint in `directory`, concatenated."""
    ids, cu = packed(LENGTHS, json.loads((directory / "config.json").read_text())["vocab_size"])
    return torch.cat(transformers_side().logits(directory, [ids[a:b].tolist() for a, b in zip(cu[:-1], cu[1:])]))


def assert_parity(model, ref):
    """Our packed logits of the LENGTHS sequences against transformers' (hf_logits)."""
    ids, cu = packed(LENGTHS, model.config.vocab_size)
    with torch.no_grad():
        ours = model(ids, cu_seqlens=cu)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4


def write_hf(directory, family, heads, kv_heads, head_dim, **kwargs):
    transformers_side().write_random(directory, family, heads, kv_heads, head_dim, **kwargs)
    return directory


@pytest.mark.parametrize("shape", SHAPES)
def test_packed_logits_match_transformers(tmp_path, shape):
    family, heads, kv, head_dim, extra = SHAPES[shape]
    write_hf(tmp_path, family, heads, kv, head_dim, **extra)
    assert_parity(load_model(tmp_path), hf_logits(tmp_path))


def test_sharded_safetensors(tmp_path):
    write_hf(tmp_path, "qwen2", 4, 2, 32, tied=False, save={"max_shard_size": "200KB"})
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert_parity(load_model(tmp_path), hf_logits(tmp_path))


def test_pytorch_bin_without_prefix(tmp_path):
    """Langboat's BLOOM repos ship pytorch_model.bin; bigscience's names lack 'transformer.'."""
    write_hf(tmp_path, "bloom", 4, 4, 16)
    ref = hf_logits(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save({k.removeprefix("transformer."): v for k, v in state.items()}, tmp_path / "pytorch_model.bin")
    assert_parity(load_model(tmp_path), ref)


def test_dtype_cast_on_load(tmp_path):
    write_hf(tmp_path, "qwen2", 4, 2, 32)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("family", ["qwen2", "bloom"])
def test_save_pretrained_round_trip(tmp_path, family):
    write_hf(tmp_path / "src", family, 4, 2 if family == "qwen2" else 4, 16)
    model = load_model(tmp_path / "src")
    model.save_pretrained(tmp_path / "out")
    reloaded = hf_logits(tmp_path / "out")                  # transformers loads what we saved
    for ours in (load_model(tmp_path / "out"), model):       # the saved folder, and the model that saved it
        assert_parity(ours, reloaded)


def test_alibi_slopes_match_transformers():
    for heads in (1, 5, 12, 16, 24, 40):
        assert torch.allclose(alibi_slopes(heads), transformers_side().alibi_slopes(heads), rtol=0, atol=0)


def test_tiny_presets_run():
    ids, cu = packed([3, 1, 8], 4096)
    for name in ("tiny-qwen2", "tiny-bloom"):
        model = load_model(name)
        assert model(ids, cu).shape == (12, 4096)
        assert torch.isfinite(model.loss(ids, ids, cu))


def test_positions_restart_per_sequence(tmp_path):
    """A sequence's logits do not depend on what is packed beside it."""
    model = load_model("tiny-qwen2")
    ids, cu = packed([6, 4], 4096)
    with torch.no_grad():
        together = model(ids, cu)
        alone = model(ids[6:], torch.tensor([0, 4], dtype=torch.int32))
    assert torch.allclose(together[6:], alone, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "bloom"])
def test_prefill_then_decode_step_match_the_packed_forward(tmp_path, family):
    """Prompts prefilled into permuted cache slots, then one decode step per sequence: the logits
    of both equal those of the packed forward over the whole sequences."""
    model = load_model(write_hf(tmp_path, family, 4, 2 if family == "qwen2" else 4, 16))
    vocab = model.config.vocab_size
    lengths, slots = [5, 1, 9], torch.tensor([2, 0, 3])
    ids, cu = packed(lengths, vocab)
    new = torch.randint(0, vocab, (3,), generator=torch.Generator().manual_seed(2))
    whole = torch.cat([torch.cat([p, t[None]]) for p, t in zip(ids.split(lengths), new)])
    whole_cu = torch.tensor([0, 6, 8, 18], dtype=torch.int32)
    cache = KVCache(model.config, slots=4, max_len=12)
    with torch.no_grad():
        want = model(whole, cu_seqlens=whole_cu)
        prompt_logits = model.prefill(ids, cu, cache, slots)
        step_logits = model.decode_step(new, torch.tensor(lengths), cache, slots)
    last = whole_cu[1:].long() - 1
    keep = torch.ones(len(whole), dtype=torch.bool)
    keep[last] = False
    assert (prompt_logits - want[keep]).abs().max().item() <= 1e-5
    assert (step_logits - want[last]).abs().max().item() <= 1e-5


# ---- bad input -------------------------------------------------------------------------------

def write_checkpoint(tmp_path):
    return write_hf(tmp_path, "qwen2", 4, 2, 16, tied=False)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'qwen9-7b'.*tiny-qwen2"):
        load_model("qwen9-7b")


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_uncached_offline_model_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="huggingface-cli download Qwen/Qwen2-0.5B-Instruct"):
        load_model("qwen2-0.5b")


def test_unknown_model_type():
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        ModelConfig.from_dict({"model_type": "llama"})


def test_config_aliases_and_defaults():
    c = ModelConfig.from_dict({"model_type": "bloom", "n_embed": 64, "n_head": 4, "n_layer": 3,
                               "torch_dtype": "bfloat16"})
    assert (c.hidden_size, c.num_heads, c.num_layers, c.dtype) == (64, 4, 3, torch.bfloat16)
    assert c.vocab_size == 250880 and c.norm_eps == 1e-5 and c.tie_word_embeddings
    q = ModelConfig.from_dict({"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4,
                               "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "dtype": "float32"})
    assert q.num_kv_heads == 4 and q.rope_theta == 1e6 and q.head_dim == 16 and not q.tie_word_embeddings


def _drop(name):
    return lambda state: state.pop(name)


def _add(name):
    return lambda state: state.__setitem__(name, torch.zeros(2))


def _truncate(name):
    return lambda state: state.__setitem__(name, state[name][:-1].clone())


@pytest.mark.parametrize("damage, message", [
    (_drop("model.layers.1.mlp.up_proj.weight"), "missing tensor.*model.layers.1.mlp.up_proj.weight"),
    (_add("model.layers.0.extra.weight"), "unexpected tensor 'model.layers.0.extra.weight'"),
    (_truncate("lm_head.weight"), r"'lm_head.weight' has shape \(319, 64\), config.json implies \(320, 64\)"),
    (_drop("lm_head.weight"), "missing tensor.*lm_head.weight"),      # untied head absent
], ids=["missing", "unexpected", "shape", "untied-head"])
def test_bad_tensors_are_named(tmp_path, damage, message):
    write_checkpoint(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    damage(state)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path)


@pytest.mark.parametrize("files, error, message", [
    ({"model.safetensors": None}, FileNotFoundError, "holds no weights"),
    ({"config.json": b"{not json"}, ValueError, "config.json is not valid JSON"),
    ({"config.json": json.dumps({"model_type": "qwen2", "hidden_size": "big"}).encode()}, ValueError,
     "hidden_size must be a positive integer"),
    ({"model.safetensors": lambda data: data[: len(data) // 2]}, CheckpointError, "truncated or corrupt"),
    ({"model.safetensors": b"\x00\x01garbage" * 10}, CheckpointError, "truncated or corrupt"),
    ({"model.safetensors": None, "pytorch_model.bin": b"not a zip file"}, CheckpointError,
     "could not be read as a PyTorch checkpoint"),
], ids=["no-weights", "config-not-json", "config-bad-value", "truncated", "garbage", "corrupt-bin"])
def test_damaged_files_are_named(tmp_path, files, error, message):
    """Each file of a checkpoint replaced by new bytes (None: deleted; a function: of its old bytes)."""
    write_checkpoint(tmp_path)
    for name, content in files.items():
        path = tmp_path / name
        if content is None:
            path.unlink()
        else:
            path.write_bytes(content(path.read_bytes()) if callable(content) else content)
    with pytest.raises(error, match=message):
        load_model(tmp_path)


def test_load_tokenizer_from_folder_and_preset(tmp_path):
    tok = load_tokenizer("tiny-qwen2")
    text = "Dictation: 床前明月光"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token_ids == [0]
    load_model("tiny-qwen2").save_pretrained(tmp_path, tok)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    from_folder = load_tokenizer(tmp_path)
    assert from_folder.eos_token_ids == [0, 2] and from_folder.encode(text) == tok.encode(text)
    assert from_folder.chat_template and "<|im_start|>" in from_folder.chat_template


def test_folder_without_tokenizer(tmp_path):
    load_model("tiny-qwen2").save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
