"""Speed of light of one training step and one evaluation decode step, per phase: FLOPs, bytes moved
and the time each would take at the card's measured matmul and copy ceilings (kernels.hardware).

    phases = train_step_phases(config, tokens=8192)      # [Phase], summed: the step at speed of light
    print(roofline_table(["qwen2-0.5b", "bloom-1b4-zh"]))   # cli.py profile prints it

This is a model, not a measurement: a phase takes max(FLOPs / matmul ceiling, bytes / copy ceiling),
each kernel is its own phase part (no overlap between kernels), caches hold nothing between kernels.
The traffic comes from the same plans the code runs: the model's own nn.Linear modules (built on the
meta device; Qwen2's fused qkv and gate_up projections are one GEMM each) give the GEMMs, kernels.linear_cross_entropy.traffic the fused loss's chunks,
engine.optim.step_traffic the optimizer's passes; change a kernel's plan and its bytes change here.
bf16 weights and activations, fp32 masters and moments, one micro-batch per step (the defaults);
sequences of `seq_len` tokens (attention keys: (seq_len + 1) / 2 per token on average), of which
`target_share` predict a poem token: the output layer and the loss run on those rows only (the
training step's model.loss(target_rows=)); summary() takes it from the model's default prompt format.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.optim import step_traffic
from kernels.hardware import PROJECTION, Hardware
from kernels.linear_cross_entropy import traffic as loss_traffic
from models import REGISTRY, KVCache, ModelConfig, model_class

BF16 = 2
DEFAULT_TOKENS = 8192      # TrainConfig's batch_tokens for pretrained models
DEFAULT_SEQ_LEN = 128      # a CN poem with its prompt, in tokens (~80-150)
EVAL_BATCH = 256           # sequences decoded together (engine.costs.EVAL_BATCH)
# The share of a step's tokens that predict a poem token, i.e. the rows of the output layer and the loss,
# by prompt format: the frozen CN-256 poems have 108,499 target tokens in 244,112 in the chat format (the
# instruct models' default) and in 152,110 in the plain one (BLOOM's), counted with the tiny tokenizer,
# the models' own being unavailable offline: a proxy, their own counts differ.
TARGET_SHARE = {"chat": 0.44, "plain": 0.71}


@dataclass(frozen=True)
class Phase:
    name: str
    flops: float
    bytes: float
    seconds: float
    bound: str            # "matmul" or "memory"


FWD, BWD, OPT = "forward", "backward", "optimizer"   # where a kernel runs, as bench/throughput.py times a step


def _kernel(flops: float, nbytes: float, hw: Hardware) -> tuple[float, str]:
    compute, memory = flops / hw.roofline_matmul_flops, nbytes / hw.roofline_bytes_per_second
    return max(compute, memory), "matmul" if compute >= memory else "memory"


def phase(name: str, kernels: list[tuple], hw: Hardware) -> Phase:
    """A phase made of kernels (flops, bytes[, stage]) run one after another."""
    timed = [_kernel(f, b, hw) for f, b, *_ in kernels]
    seconds = sum(t for t, _ in timed)
    matmul = sum(t for t, bound in timed if bound == "matmul")
    return Phase(name, sum(k[0] for k in kernels), sum(k[1] for k in kernels), seconds,
                 "matmul" if matmul >= seconds / 2 else "memory")


def layer_linears(config: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) of every nn.Linear in the blocks, read from the model as built (meta device)."""
    with torch.device("meta"):
        model = model_class(config)(config)
    return [(m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and "lm_head" not in name]


def train_step_kernels(config: ModelConfig, tokens: int = DEFAULT_TOKENS, seq_len: int = DEFAULT_SEQ_LEN,
                       target_share: float = 1.0) -> dict[str, list[tuple[float, float, str]]]:
    """Phase name -> its kernels (flops, bytes, stage): stage is FWD, BWD or OPT, where the kernel runs
    in bench/throughput.py's split of a step (the fused loss computes its gradients in the forward;
    the hooks' gradient adds run during the backward)."""
    T, h, L, e = tokens, config.hidden_size, config.num_layers, BF16
    q_dim, kv_dim, inter = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, \
        config.intermediate_size
    qwen = config.model_type == "qwen2"
    gemms = []
    for i, o in layer_linears(config):   # forward, grad of the input, grad of the weight (bf16, then the hook's add)
        gemms += [(2 * T * i * o, e * (T * i + i * o + T * o), FWD), (2 * T * i * o, e * (T * o + i * o + T * i), BWD),
                  (2 * T * i * o, e * (T * i + T * o + i * o), BWD)]
    ctx = (seq_len + 1) / 2
    attention = [(4 * T * ctx * q_dim, e * T * (2 * q_dim + 2 * kv_dim), FWD),
                 (8 * T * ctx * q_dim, e * T * (3 * q_dim + 5 * kv_dim), BWD)] * L
    # every residual add is fused into the norm after it (2 L norms: x and the stream read, the sum and the
    # output written; backward also reads the sum's gradient); the first block's input norm (and BLOOM's
    # embedding norm) have no add
    norms = [(0, 4 * e * T * h, FWD), (0, 4 * e * T * h, BWD)] * (2 * L) + \
        [(0, 2 * e * T * h, FWD), (0, 3 * e * T * h, BWD)] * (1 if qwen else 2)
    if qwen:   # RoPE on q and k (its backward also copies dv into the fused qkv gradient); SwiGLU on the fused gate_up
        rope = [(0, 2 * e * T * (q_dim + kv_dim), FWD), (0, 2 * e * T * (q_dim + 2 * kv_dim), BWD)]
        elementwise = (rope + [(0, 3 * e * T * inter, FWD), (0, 5 * e * T * inter, BWD)]) * L
    else:      # GELU
        elementwise = [(0, 2 * e * T * inter, FWD), (0, 3 * e * T * inter, BWD)] * L
    V, K = config.vocab_size, round(T * target_share)      # K: the target rows the output layer sees
    gemm_flops = {"logits GEMM": 2 * K * V * h, "grad_hidden GEMM": 2 * K * V * h, "grad_W GEMM": 2 * K * V * h}
    loss = [(gemm_flops.get(part, 0), nbytes, BWD if part == "grad_W round, scale" else FWD)
            for part, nbytes in loss_traffic(K, h, V, torch.bfloat16).items()]
    if K < T:   # the target rows gathered (forward), their gradient scattered into a zeroed [T, h] (backward)
        loss += [(0, 2 * e * K * h, FWD), (0, e * T * h + 2 * e * K * h, BWD)]
    # embedding: gather forward; backward a dense [V, h] gradient written, added to the head's when tied
    embedding = [(0, e * T * h, FWD),
                 (0, e * V * h + e * T * h + (3 * e * V * h if config.tie_word_embeddings else 0), BWD)]
    with torch.device("meta"):
        n = model_class(config)(config).num_parameters()
    optimizer = [(0, nbytes, BWD if "hooks" in part else OPT) for part, nbytes in step_traffic(n, BF16).items()]
    return {"layer GEMMs": gemms, "attention": attention, "norms": norms, "rope + activations": elementwise,
            "LM head + loss": loss, "embedding": embedding, "optimizer": optimizer}


def train_step_phases(config: ModelConfig, tokens: int = DEFAULT_TOKENS, seq_len: int = DEFAULT_SEQ_LEN,
                      hw: Hardware = PROJECTION, target_share: float = 1.0) -> list[Phase]:
    return [phase(name, kernels, hw) for name, kernels in train_step_kernels(config, tokens, seq_len,
                                                                            target_share).items()]


def stage_seconds(config: ModelConfig, tokens: int = DEFAULT_TOKENS, seq_len: float = DEFAULT_SEQ_LEN,
                  hw: Hardware = PROJECTION, target_share: float = 1.0) -> dict[str, float]:
    """The modeled step split as bench/throughput.py measures it: {forward, backward, optimizer} seconds."""
    split = dict.fromkeys((FWD, BWD, OPT), 0.0)
    for kernels in train_step_kernels(config, tokens, seq_len, target_share).values():
        for flops, nbytes, stage in kernels:
            split[stage] += _kernel(flops, nbytes, hw)[0]
    return split


def decode_step_phases(config: ModelConfig, batch: int = EVAL_BATCH, context: int = DEFAULT_SEQ_LEN,
                       hw: Hardware = PROJECTION) -> list[Phase]:
    """One greedy decode step of `batch` sequences with `context` cached tokens each: every weight read once
    (bf16), the KV cache read, the argmax's fp32 logits tiles written and read."""
    with torch.device("meta"):
        n = model_class(config)(config).num_parameters()
    h, V = config.hidden_size, config.vocab_size
    head = 2 * batch * h * V
    return [phase("weights (GEMMs)", [(2 * batch * (n - V * h), BF16 * (n - V * h))], hw),
            phase("KV cache (attention)", [(4 * batch * context * config.num_heads * config.head_dim,
                                            batch * context * KVCache.bytes_per_token(config, torch.bfloat16))], hw),
            phase("LM head + argmax", [(head, BF16 * V * h + 8 * batch * V)], hw)]


def summary(name: str, config: ModelConfig, tokens: int = DEFAULT_TOKENS, hw: Hardware = PROJECTION) -> dict:
    """The modeled step of a registry model (or folder) in its default prompt format's TARGET_SHARE."""
    spec = REGISTRY.get(name)
    share = TARGET_SHARE["chat" if spec is not None and spec.chat else "plain"]
    train, decode = train_step_phases(config, tokens, hw=hw, target_share=share), decode_step_phases(config, hw=hw)
    step, decode_s = sum(p.seconds for p in train), sum(p.seconds for p in decode)
    return {"model": name, "tokens": tokens, "step_seconds": step, "train_tokens_per_second": tokens / step,
            "decode_step_seconds": decode_s, "decode_tokens_per_second": EVAL_BATCH / decode_s,
            "phases": train, "decode_phases": decode}


def roofline_table(models: list[str], tokens: int = DEFAULT_TOKENS, hw: Hardware = PROJECTION) -> str:
    from engine.costs import model_config
    from engine.report import markdown_table
    rows, details = [], []
    for name in models:
        s = summary(name, model_config(name), tokens, hw)
        top = sorted(s["phases"], key=lambda p: -p.seconds)[:3]
        rows.append([name, f"{s['step_seconds'] * 1e3:.1f}", f"{s['train_tokens_per_second']:,.0f}",
                     "; ".join(f"{p.name} {p.seconds * 1e3:.1f} ms ({p.bound})" for p in top),
                     f"{s['decode_tokens_per_second']:,.0f}"])
        details += [[name, p.name, f"{p.flops / 1e12:.2f}", f"{p.bytes / 1e9:.2f}", f"{p.seconds * 1e3:.2f}", p.bound]
                    for p in s["phases"]]
    ceilings = (f"{hw.name}: matmul {hw.roofline_matmul_flops / 1e12:.0f} TFLOP/s, copy "
                f"{hw.roofline_bytes_per_second / 1e12:.1f} TB/s")
    return (f"Speed of light (a model, engine/roofline.py; {ceilings}): one training step of {tokens:,} tokens "
            f"(sequences of {DEFAULT_SEQ_LEN}; the output layer and loss on the {TARGET_SHARE['chat']:.0%} (chat format) "
            f"or {TARGET_SHARE['plain']:.0%} (plain) of the rows that predict a poem token), one decode step of "
            f"{EVAL_BATCH} sequences.\n\n"
            + markdown_table(["model", "step ms", "train tok/s", "three largest phases", "decode tok/s"], rows)
            + "\n\n" + markdown_table(["model", "phase", "TFLOP", "GB", "ms", "bound"], details))
