"""Checkpoint I/O: Hugging Face safetensors (single or sharded) and pytorch_model.bin in,
config.json + model.safetensors out.

The models use transformers' module names, so a checkpoint tensor name is a state_dict key,
up to the body prefix ("model." / "transformer."), which some checkpoints omit, and up to the
fused projections, whose rows each part's name holds (`checkpoint_tensors`). Loading
builds the model on the meta device, allocates it once in the target dtype, and copies the
checkpoint in tensor by tensor: no second full copy of the model is ever held. A model sharded
on the meta device (FSDP2, several ranks) is allocated as this rank's shards, which take only
their rows of each tensor: no rank ever holds the whole model.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.masked_bias", ".attn.bias")


class CheckpointError(ValueError):
    pass


def checkpoint_files(directory: Path) -> list[Path]:
    """The weight files of a model folder, in the order to read them."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise CheckpointError(f"{index} is malformed ({e}); download it again") from None
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise CheckpointError(f"{directory}: shard(s) {', '.join(missing)} listed in {index_name} are missing")
            return [directory / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    raise FileNotFoundError(f"{directory} holds no weights (model.safetensors, a sharded index, or "
                            "pytorch_model.bin): download the model's weight files into it")


def iter_tensors(path: Path):
    """(name, tensor) pairs of one weight file, read lazily."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{path} is truncated or corrupt ({e}); download it again") from None
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint ({type(e).__name__}: {e}); "
                              "it may be truncated or corrupt: download it again") from None
    yield from state.items()


def checkpoint_rows(model) -> dict[str, tuple[torch.Tensor, int, int | None]]:
    """Every checkpoint tensor's name: (the parameter holding it, its first row there, its row count,
    None for all of it). A fused projection (models.base.FusedLinear) holds its parts' rows in order
    (qkv_proj.weight: q_proj.weight's rows, then k_proj's, then v_proj's)."""
    rows = {}
    for name, p in model.named_parameters():
        module_name, _, kind = name.rpartition(".")
        parts = getattr(model.get_submodule(module_name), "checkpoint_parts", None)
        if parts is None:
            rows[name] = (p, 0, None)
            continue
        parent, start = module_name.rpartition(".")[0], 0
        for part, count in parts.items():
            rows[f"{parent}.{part}.{kind}"] = (p, start, count)
            start += count
    return rows


def checkpoint_tensors(model) -> dict[str, torch.Tensor]:
    """Every parameter under its checkpoint name; a fused projection's as the row views its parts own,
    each under its part's name (qkv_proj.weight -> q_proj.weight, ...)."""
    return {name: p if count is None else p[start:start + count]
            for name, (p, start, count) in checkpoint_rows(model).items()}


def write_rows(param: torch.Tensor, start: int, tensor: torch.Tensor) -> None:
    """`tensor` into param's rows from `start`. A parameter sharded by rows across ranks (FSDP2's DTensor,
    Shard(0): rank r holds rows [r*c, (r+1)*c), c = ceil(rows / ranks)) takes only the rows this rank holds."""
    local, first = param, 0
    if hasattr(param, "to_local"):
        local, mesh = param.to_local(), param.device_mesh
        per_rank = -(-param.shape[0] // mesh.size())
        first = min(mesh.get_local_rank() * per_rank, param.shape[0])
        if len(param.placements) != 1 or not param.placements[0].is_shard(0) or \
                local.shape[0] != min(per_rank, param.shape[0] - first):
            raise NotImplementedError(f"a parameter sharded as {param.placements} with local rows "
                                      f"{local.shape[0]} of {param.shape[0]}: only FSDP2's row sharding loads")
    low, high = max(start, first), min(start + tensor.shape[0], first + local.shape[0])
    if low < high:
        with torch.no_grad():
            local[low - first:high - first].copy_(tensor[low - start:high - start])


def load_weights(model, directory: Path) -> None:
    """Fill `model` (allocated, in its dtype; its parameters may be FSDP2 shards, which take their rows
    only) from the checkpoint in `directory`."""
    expected = checkpoint_rows(model)
    prefix = model.body_prefix
    loaded = set()
    for path in checkpoint_files(directory):
        for name, tensor in iter_tensors(path):
            if name == "lm_head.weight" and name not in expected:
                continue                                   # tied: the output matrix is the embedding
            key = name if name in expected or name.startswith(prefix) else prefix + name
            if key not in expected:
                if name.endswith(IGNORED_SUFFIXES):
                    continue
                raise CheckpointError(f"{path.name}: unexpected tensor {name!r}: is this checkpoint a "
                                      f"{model.config.model_type} model as its config.json says?")
            param, start, count = expected[key]
            shape = tuple(param.shape) if count is None else (count, *param.shape[1:])
            if tuple(tensor.shape) != shape:
                raise CheckpointError(f"{path.name}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                      f"config.json implies {shape}")
            write_rows(param, start, tensor)
            loaded.add(key)
    missing = sorted(set(expected) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{directory}: missing tensor(s) {shown}")


def save_pretrained(model, out_dir, tokenizer=None) -> None:
    """config.json + model.safetensors (+ tokenizer files) that transformers loads as-is."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().contiguous().cpu() for name, t in checkpoint_tensors(model).items()}
    atomic_write(out_dir / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    config = model.config.to_dict(model.dtype)
    atomic_write(out_dir / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    if tokenizer is not None:
        tokenizer.save(out_dir)


def atomic_write(path: Path, write) -> None:
    """write(tmp), flushed to the disk, then renamed over path: a reader never sees half a file, and a
    kill at any instant leaves the old file or the new one. The file gets the mode any file the user
    writes would have (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
