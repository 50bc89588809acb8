"""BLOOM: LayerNorm after the word embeddings, pre-norm blocks with ALiBi attention (no
position embeddings), a fused query_key_value projection and a tanh-GELU MLP; the output
matrix is the embedding.

    x = layernorm(embed(ids))
    for each block:  x = x + attn(layernorm(x));  x = x + mlp(layernorm(x))
    hidden = layernorm(x);  logits = hidden @ E^T

With apply_residual_connection_post_layernorm the residual is the normalized input instead.
query_key_value's output rows are interleaved per head: (q, k, v) of head 0, then head 1, ...
Module and parameter names are transformers' own. The residual adds are fused into the next norm
(layer_norm(..., residual=)).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kernels.gelu import gelu
from models.base import AttentionContext, CausalLM, LayerNorm, attend
from models.config import ModelConfig


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """BLOOM's per-head ALiBi slopes (Press et al.), exact for non-power-of-2 head counts too,
    computed in fp32 powers as transformers does so that they agree to the bit."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        extra = min(closest, num_heads - closest)
        slopes = torch.cat([slopes, torch.pow(extra_base, torch.arange(1, 1 + 2 * extra, 2, dtype=torch.int32))])
    return slopes


class BloomAttention(nn.Module):
    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.c = layer, c
        self.query_key_value = nn.Linear(c.hidden_size, 3 * c.hidden_size)
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x, ctx: AttentionContext, slopes):
        tokens, c = x.shape[0], self.c
        q, k, v = self.query_key_value(x).view(tokens, c.num_heads, 3, c.head_dim).unbind(2)
        return self.dense(attend(q, k, v, self.layer, ctx, slopes).reshape(tokens, -1))


class BloomMLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(c.hidden_size, c.intermediate_size)
        self.dense_4h_to_h = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(gelu(self.dense_h_to_4h(x)))


class BloomBlock(nn.Module):
    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.post_ln_residual = c.residual_post_layernorm
        self.input_layernorm = LayerNorm(c.hidden_size, c.norm_eps)
        self.self_attention = BloomAttention(c, layer)
        self.post_attention_layernorm = LayerNorm(c.hidden_size, c.norm_eps)
        self.mlp = BloomMLP(c)

    def forward(self, x, residual, ctx: AttentionContext, slopes):
        """x: the previous sublayer's output; residual: what it adds to (None at block 0). Returns this
        block's MLP output and what that adds to: the stream, or with apply_residual_connection_post_layernorm
        the post-attention norm's output."""
        h, stream = self.input_layernorm(x, residual) if residual is not None else (self.input_layernorm(x), x)
        h2, stream = self.post_attention_layernorm(self.self_attention(h, ctx, slopes),
                                                   h if self.post_ln_residual else stream)
        return self.mlp(h2), h2 if self.post_ln_residual else stream


class BloomForCausalLM(CausalLM):
    body_prefix = "transformer."

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            word_embeddings=nn.Embedding(config.vocab_size, config.hidden_size),
            word_embeddings_layernorm=LayerNorm(config.hidden_size, config.norm_eps),
            h=nn.ModuleList(BloomBlock(config, i) for i in range(config.num_layers)),
            ln_f=LayerNorm(config.hidden_size, config.norm_eps)))
        self._slopes = None               # fp32 whatever the model's dtype, so not a buffer

    def slopes(self, device) -> torch.Tensor:
        if self._slopes is None or self._slopes.device != device:
            # made outside inference mode (as rope's inv_freq): a first forward under
            # torch.inference_mode must not cache an inference tensor that training then saves for backward
            with torch.inference_mode(False):
                self._slopes = alibi_slopes(self.config.num_heads).to(device)
        return self._slopes

    def output_weight(self) -> torch.Tensor:
        return self.transformer.word_embeddings.weight

    def hidden_states(self, input_ids, ctx: AttentionContext) -> torch.Tensor:
        t = self.transformer
        x, residual = t.word_embeddings_layernorm(t.word_embeddings(input_ids)), None
        slopes = self.slopes(x.device)
        for block in t.h:
            x, residual = block(x, residual, ctx, slopes)
        return t.ln_f(x, residual)[0]
