"""Provenance: the model's files by digest, its hub id and revision from a cache snapshot's path, versions."""
import hashlib
import re

import torch

from engine.provenance import engine_commit, model_source, provenance, versions


def test_a_cache_snapshot_names_its_repository_revision_and_weights(tmp_path):
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2-0.5B-Instruct" / "snapshots" / "c540970f9e29518b1d8f06ab8b24cba66ad77b6d"
    snapshot.mkdir(parents=True)
    shards = {"model-00001-of-00002.safetensors": b"\x01" * (1 << 20) + b"x", "model-00002-of-00002.safetensors": b"y",
              "pytorch_model.bin": b"z" * 3}
    for name, data in shards.items():
        (snapshot / name).write_bytes(data)
    (snapshot / "config.json").write_text("{}")
    source = model_source("qwen2-0.5b", snapshot, None)
    assert source["hub_id"] == "Qwen/Qwen2-0.5B-Instruct" and source["revision"] == snapshot.name
    assert source["weights_sha256"] == {name: hashlib.sha256(data).hexdigest() for name, data in shards.items()}
    plain = model_source(str(tmp_path / "mine"), None, None)
    assert plain["weights_sha256"] is None and plain["revision"] is None


def test_versions_and_the_engine_commit():
    found = versions("cpu")
    assert found["torch"] == torch.__version__
    assert "driver" not in found and found["python"].count(".") == 2
    state = engine_commit()
    assert state["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", state["commit"]) and isinstance(state["dirty"], bool)


def test_a_clean_checkout_is_not_dirty(tmp_path, monkeypatch):
    import subprocess

    import engine.provenance
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["add", "a.py"], check=True)
    subprocess.run(git + ["commit", "-qm", "a"], check=True)
    monkeypatch.setattr(engine.provenance, "ROOT", tmp_path)
    assert engine_commit()["dirty"] is False
    (tmp_path / "a.py").write_text("x = 2\n")
    assert engine_commit()["dirty"] is True
    record = provenance(model_source("tiny-qwen2", None, None), "cpu")
    assert record["device"].startswith("cpu") and record["command"].split()[0].startswith("python")
