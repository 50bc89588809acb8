"""The transformers side of the tests and benchmarks, in a process of its own.

The engine imports its packages (kernels/, models/, engine/) from its checkout by name, and one of
those names is taken: transformers 5 imports Hugging Face's own `kernels` package. So nothing of
transformers runs in our process. TransformersSide starts this file as a worker with the checkout
off its sys.path, sends it requests and gets tensors and numbers back:

    side = TransformersSide(threads=1)
    side.write_random(folder, "qwen2", heads=4, kv_heads=2, head_dim=16)   # a checkpoint transformers wrote
    logits = side.logits(folder, [[1, 2, 3], [4, 5]])                      # one [len, V] tensor per sequence
    side.close()

A process of its own also keeps each side's peak memory its own and Liger's monkey-patching of
transformers' classes out of ours (a benchmark starts one worker per model and one per Liger run).
The worker imports torch, transformers and bench/timing.py (loaded by its path) and nothing else of
ours: what it computes is transformers' answer alone.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


class TransformersSide:
    """A worker process that runs transformers; `side.NAME(**kwargs)` calls the worker's function NAME
    (WORKER_OPS below) and returns its result. Started on the first call, ended by close() or at exit."""

    def __init__(self, threads: int | None = None):
        self.threads = threads
        self._proc = None

    def call(self, op: str, *args, **kwargs):
        if self._proc is None:
            argv = [sys.executable, str(Path(__file__))] + (["--threads", str(self.threads)] if self.threads else [])
            self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            pickle.dump((op, args, kwargs), self._proc.stdin)
            self._proc.stdin.flush()
            ok, value = pickle.load(self._proc.stdout)
        except (EOFError, BrokenPipeError, pickle.UnpicklingError) as e:
            self.close()
            raise RuntimeError(f"the transformers process ended during {op}() ({type(e).__name__}): its messages "
                               "are on stderr above") from None
        if not ok:
            raise RuntimeError(f"transformers side, {op}(): {value}")
        return value

    def __getattr__(self, op: str):
        if op.startswith("_"):
            raise AttributeError(op)
        return lambda *args, **kwargs: self.call(op, *args, **kwargs)

    def close(self) -> None:
        if self._proc is not None:
            proc, self._proc = self._proc, None
            proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def __enter__(self) -> "TransformersSide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


# ================================================================ the worker (its own process)

def _worker() -> None:
    """Serve requests from stdin until it closes. Results go to a copy of stdout taken first; stdout
    itself then points at stderr, so that whatever transformers prints cannot corrupt a reply."""
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    if "--threads" in sys.argv:
        import torch
        torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]))
    while True:
        try:
            op, args, kwargs = pickle.load(sys.stdin.buffer)
        except EOFError:
            return
        try:
            reply = (True, WORKER_OPS[op](*args, **kwargs))
        except Exception as e:  # the caller raises it, naming the op, and says it in one line
            reply = (False, f"{type(e).__name__}: {e}")
        pickle.dump(reply, replies)
        replies.flush()


def _timing():
    """bench/timing.py, loaded by its path (importing the bench package would need the checkout on sys.path)."""
    import importlib.util
    if "bench_timing" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_timing", HERE / "timing.py")
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)     # before running it: dataclasses look it up
        spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules["bench_timing"]


STATE = {}      # the worker's current model, between a load/train call and the generate calls that follow


# ---------------------------------------------------------------- checkpoints and references (tests)

def write_random(directory, family: str, heads: int, kv_heads: int, head_dim: int, layers: int = 2, vocab: int = 320,
                 tied: bool = True, seed: int = 0, scale: float = 0.1, multiply: dict | None = None,
                 save: dict | None = None, **extra) -> dict:
    """A random fp32 checkpoint written by transformers: matrices with std 1/sqrt(fan_in) (embeddings too),
    so activations and logits stay O(1) as in a trained model, norm weights around 1; then each parameter
    whose name contains a key of `multiply` scaled by its value. Returns the config's dict."""
    import torch
    import transformers
    if family == "qwen2":
        config = transformers.Qwen2Config(
            vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=3 * head_dim, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied, rope_theta=10000.0,
            max_position_embeddings=4096, eos_token_id=0, bos_token_id=0, pad_token_id=0, **extra)
        cls = transformers.Qwen2ForCausalLM
    else:
        config = transformers.BloomConfig(vocab_size=vocab, hidden_size=heads * head_dim, n_layer=layers,
                                          n_head=heads, eos_token_id=0, bos_token_id=0, pad_token_id=0, **extra)
        cls = transformers.BloomForCausalLM
    torch.manual_seed(seed)
    model = cls._from_config(config, attn_implementation="eager", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_f" in name:
                p.copy_(1 + scale * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0, scale)
            elif p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5)
            else:
                p.normal_(0, scale)
            for pattern, factor in (multiply or {}).items():
                if pattern in name:
                    p.mul_(factor)
    model.generation_config.eos_token_id = None
    model.save_pretrained(directory, **(save or {}))
    return config.to_dict()


def _load(directory, dtype=None, device="cpu"):
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), attn_implementation="eager",
                                                              dtype=dtype or torch.float32)
    return model.to(device).eval()


def logits(directory, sequences: list[list[int]], dtype=None) -> list:
    """transformers' logits [len, V] of each sequence alone (eager attention, fp32 unless `dtype`)."""
    import torch
    model = _load(directory, dtype)
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0] for ids in sequences]


def generate(directory, prompts: list[list[int]], caps: list[int], eos: int | None = None) -> list[list[int]]:
    """model.generate on each prompt alone, greedily: its new tokens, cut before `eos`."""
    import torch
    model = _load(directory)
    out = []
    with torch.no_grad():
        for prompt, cap in zip(prompts, caps):
            ids = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=cap, eos_token_id=eos,
                                 pad_token_id=0)[0, len(prompt):].tolist()
            out.append(ids[:-1] if eos is not None and ids and ids[-1] == eos else ids)
    return out


def alibi_slopes(heads: int):
    """BLOOM's per-head ALiBi slopes, as transformers builds them."""
    import torch
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    return build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)[:, 0, 1]


def chat_template(directory, messages: list[dict]) -> tuple[str, list[int]]:
    """The tokenizer's chat template applied with a generation prompt: (text, ids)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return text, list(ids["input_ids"] if hasattr(ids, "keys") else ids)


# ---------------------------------------------------------------- the benchmarks' peer

def from_config(raw: dict, device, dtype):
    """transformers' model for these config.json keys (dtype keys left out), its own random init run on
    the device (a 1.7B init on the host takes many seconds). Attention: transformers' default."""
    import torch
    import transformers
    config = transformers.AutoConfig.for_model(**{k: v for k, v in raw.items()
                                                  if k not in ("torch_dtype", "dtype", "architectures")})
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)


def write_from_config(raw: dict, directory) -> None:
    """A checkpoint of transformers' own random init (std 0.02) for these config.json keys, on the CPU."""
    import torch
    from_config(raw, "cpu", torch.float32).save_pretrained(directory)


def load(directory, device, dtype) -> dict:
    """Make the checkpoint in `directory` the worker's model (default attention), for generate_timed."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None
    STATE["model"] = model
    return {"attention": model.config._attn_implementation}


def train(raw: dict, inputs: list, real_tokens: list[int], warmup: int, device, dtype, liger: bool = False) -> dict:
    """The usual stack's training steps: the model from `raw` (Liger's Qwen2 kernels applied when asked),
    torch.optim.AdamW (fused on CUDA), clip_grad_norm_, each padded (ids, mask, labels) batch of `inputs`
    one step, split into micro-batches only when it does not fit. The first `warmup` steps are untimed.
    Returns real tokens/s (median step), the step times, peak memory (model and optimizer included) and
    the padding; the model stays the worker's, for generate_timed."""
    import torch
    timing = _timing()
    STATE.pop("model", None)
    with timing.PeakMemory(device) as mem:
        model = from_config(raw, device, dtype)
        if liger:
            from liger_kernel.transformers import apply_liger_kernel_to_qwen2
            apply_liger_kernel_to_qwen2(model=model)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=torch.device(device).type == "cuda")
        inputs = [tuple(t.to(device) for t in x) for x in inputs]
        splits = {"n": 1}

        def accumulate(ids, mask, labels, n) -> bool:
            try:
                for i in range(n):
                    part = slice(i * len(ids) // n, (i + 1) * len(ids) // n)
                    loss = model(input_ids=ids[part], attention_mask=mask[part], labels=labels[part]).loss
                    (loss * (labels[part, 1:] != -100).sum() / (labels[:, 1:] != -100).sum()).backward()
                return True
            except torch.OutOfMemoryError:
                return False

        def step(x):
            while not accumulate(*x, splits["n"]):
                opt.zero_grad(set_to_none=True)
                timing.free(device)
                splits["n"] *= 2
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        timed = timing.time_steps(step, inputs, real_tokens, warmup, device)
    del opt
    STATE["model"] = model
    return {**timed, "peak_memory_bytes": mem.bytes, "micro_batches": splits["n"],
            "padded_tokens": sum(x[0].numel() for x in inputs[warmup:]), "real_tokens": sum(real_tokens[warmup:]),
            "attention": model.config._attn_implementation}


def generate_timed(prompts: list[list[int]], max_new_tokens: int, batch_size: int, eos: int | None = None,
                   reps: int = 1) -> dict:
    """The worker's model's greedy generate on the left-padded prompts (attention mask), `batch_size` a
    batch, after one small warm-up call: the outputs (cut before their first `eos`) and each rep's seconds.
    Without `eos` every output runs to max_new_tokens."""
    import torch
    timing = _timing()
    model = STATE["model"].eval()
    timer = timing.Timer(model.device)

    def run(prompts, new, batch):
        out = []
        stop = {"eos_token_id": eos} if eos is not None else {"min_new_tokens": new}
        for i in range(0, len(prompts), batch):
            part = prompts[i:i + batch]
            width = max(map(len, part))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in part], device=model.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in part], device=model.device)
            with torch.inference_mode():
                gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                                     pad_token_id=0, **stop)
            out += [row[:row.index(eos)] if eos in row else row for row in gen[:, width:].tolist()]
        return out

    run(prompts[:4], 4, 4)
    runs = [timer.seconds(lambda: run(prompts, max_new_tokens, batch_size)) for _ in range(reps)]
    return {"outputs": runs[0][0], "seconds": [s for _, s in runs]}


WORKER_OPS = {f.__name__: f for f in (write_random, logits, generate, alibi_slopes, chat_template, write_from_config,
                                      load, train, generate_timed)}


if __name__ == "__main__":
    # Off the path: this folder (the script's, first) and the checkout, wherever PYTHONPATH put them.
    ours = {HERE, ROOT}
    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() not in ours]
    _worker()
