"""TrainConfig is the one source of a run's settings: every field is a `cli.py memorize` flag, and
the flags a config is turned into (the sweep's subprocesses) parse back into the same config."""
import argparse
import json
from dataclasses import asdict, replace

import pytest

from cli import parser
from engine.sweep import cli_arguments
from engine import train
from engine.train import FIELDS, TrainConfig, config_flags, from_flags

# One value per field, each different from its default.
CHANGED = dict(model="runs/some model/model", lang="en", length=512, poems=7, epochs=3, lr=1.25e-4, batch_tokens=2048,
               micro_batch_tokens=1000, eval_every=2, checkpoint_every=5, seed=11, out="runs/x y", resume=True,
               warmup_steps=0, schedule="constant", weight_decay=0.0, betas=(0.8, 0.999), max_grad_norm=0.3,
               format="plain", source="poems.jsonl", device="cuda:1", log_every=1, keep_checkpoints=3)


def test_every_field_has_a_flag_with_its_help():
    assert CHANGED.keys() == FIELDS.keys()
    assert all(CHANGED[name] != TrainConfig.default(name) for name in FIELDS if name != "model")
    commands = next(action for action in parser()._actions if isinstance(action, argparse._SubParsersAction))
    flags = {action.dest: action.help for action in commands.choices["memorize"]._actions if action.dest != "help"}
    launcher = {"config", "nproc_per_node"}        # how to start a run, not its settings
    assert flags.keys() - launcher == FIELDS.keys() and all(flags.values())


@pytest.mark.parametrize("changed", [{"model": "tiny-qwen2", name: value} for name, value in CHANGED.items()] + [CHANGED],
                         ids=list(CHANGED) + ["all"])
def test_config_to_flags_to_config_is_the_identity(changed, monkeypatch):
    config = TrainConfig(**changed)
    # a resumed run's settings come from its folder: here, the config itself as config.json holds it
    monkeypatch.setattr(train, "run_settings", lambda out: json.loads(json.dumps(asdict(config))))
    # betas too: a list from argparse would not compare equal; a resume names the folder it continues
    expected = replace(config, out=config.out or "runs/tiny-qwen2-cn-256") if config.resume else config
    assert from_flags(parser().parse_args(cli_arguments(config))) == expected


def test_presets_and_pretrained_models_read_the_same_defaults():
    tiny, full = TrainConfig(model="tiny-qwen2").resolved(), TrainConfig(model="qwen2-0.5b").resolved()
    assert (tiny.poems, tiny.lr, tiny.batch_tokens, tiny.micro_batch_tokens) == (32, 3e-3, 256, 256)
    assert (full.poems, full.lr, full.batch_tokens, full.micro_batch_tokens) == (2000, 2e-5, 8192, 8192)
    assert TrainConfig.default("batch_tokens") == 8192 and TrainConfig.default("poems", tiny=True) == 32
    assert full.out == "runs/qwen2-0.5b-cn-256" and config_flags(TrainConfig("qwen2-0.5b")) == ["--model", "qwen2-0.5b"]


@pytest.mark.parametrize("length", [256, 512])
def test_a_presets_defaults_fit_both_length_bins(length):
    from engine.data import encode_examples, load_poems, model_format
    from models import load_tokenizer
    budget = TrainConfig(model="tiny-qwen2", length=length).resolved().micro_batch_tokens
    tokenizer = load_tokenizer("tiny-qwen2")
    examples = encode_examples(load_poems("cn", length, n=None), tokenizer, "cn", model_format("tiny-qwen2", tokenizer))
    assert max(map(len, examples)) <= budget
