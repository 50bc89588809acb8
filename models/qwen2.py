"""Qwen2 family (Qwen1.5, Qwen2, Qwen2.5): pre-norm decoder with RMSNorm, RoPE (NeoX layout),
grouped-query attention with q/k/v biases, and a SwiGLU MLP.

    x = embed(ids)
    for each block:  x = x + attn(rmsnorm(x));  x = x + mlp(rmsnorm(x))
    hidden = rmsnorm(x);  logits = hidden @ W_out^T   (W_out tied to the embedding or not)

Module and parameter names are transformers' own, except two fused projections: q, k and v are
one GEMM (qkv_proj), gate and up another (gate_up_proj); checkpoints keep transformers' names
(q_proj/k_proj/v_proj, gate_proj/up_proj: models/weights.py splits the rows). The residual adds
are fused into the next norm (rms_norm(..., residual=)).
"""
from __future__ import annotations

import torch
from torch import nn

from kernels.rope import rope_qkv
from kernels.swiglu import swiglu
from models.base import AttentionContext, CausalLM, FusedLinear, RMSNorm, attend
from models.config import ModelConfig


class Qwen2Attention(nn.Module):
    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.c = layer, c
        q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.qkv_proj = FusedLinear(c.hidden_size, {"q_proj": q_dim, "k_proj": kv_dim, "v_proj": kv_dim}, bias=True)
        self.o_proj = nn.Linear(q_dim, c.hidden_size, bias=False)

    def forward(self, x, ctx: AttentionContext):
        c = self.c
        q, k, v = rope_qkv(self.qkv_proj(x), c.num_heads, c.num_kv_heads, ctx.position_ids, c.rope_theta)
        return self.o_proj(attend(q, k, v, self.layer, ctx).reshape(x.shape[0], -1))


class Qwen2MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        inter = c.intermediate_size
        self.gate_up_proj = FusedLinear(c.hidden_size, {"gate_proj": inter, "up_proj": inter}, bias=False)
        self.down_proj = nn.Linear(inter, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_up_proj(x)))


class Qwen2Block(nn.Module):
    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.self_attn = Qwen2Attention(c, layer)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.mlp = Qwen2MLP(c)

    def forward(self, x, residual, ctx: AttentionContext):
        """x: the previous sublayer's output; residual: the stream it adds to (None at block 0).
        Returns this block's MLP output and the stream before it."""
        h, residual = self.input_layernorm(x, residual) if residual is not None else (self.input_layernorm(x), x)
        h, residual = self.post_attention_layernorm(self.self_attn(h, ctx), residual)
        return self.mlp(h), residual


class Qwen2ForCausalLM(CausalLM):
    body_prefix = "model."

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(Qwen2Block(config, i) for i in range(config.num_layers)),
            norm=RMSNorm(config.hidden_size, config.norm_eps)))
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def hidden_states(self, input_ids, ctx: AttentionContext) -> torch.Tensor:
        x, residual = self.model.embed_tokens(input_ids), None
        for block in self.model.layers:
            x, residual = block(x, residual, ctx)
        return self.model.norm(x, residual)[0]
