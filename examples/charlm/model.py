"""A small decoder-only transformer over characters: raygd's sequence-model example.

Use it with raygd by import string (run from the repository root, or wherever ``examples`` imports)::

    train:
      model: examples.charlm.model:build      # build(input_shape, num_classes, **train.model_args)
      model_args: {n_layers: 2, d_model: 128, n_heads: 4}
    data:
      name: examples.charlm.data:load         # (train, test) of char-id windows, see data.py
      args: {context: 64}

The forward maps token ids ``[N, T]`` (LongTensor) to next-token logits ``[N, T, C]``, C the vocabulary
size. raygd's objective (``raygd.loss``) treats one sequence as one example: f_i is the mean cross
entropy over its T positions, so B, n and the bound B_D count sequences, and accuracy is token accuracy.

Choices made for per-example gradients and the mechanisms:

- no dropout and no BatchNorm: an example's gradient must depend on that example only (LayerNorm
  normalises within one position, so it qualifies);
- every projection is an ``nn.Linear`` (qkv, attention output, MLP, head), the layers raygd's ghost norms
  and DropConnect handle;
- the output head is *not* weight-tied to the token embedding (GPT-2 ties them): raygd's exact
  per-example norms refuse a parameter that two layers share.

Initialisation is GPT-2's: N(0, 0.02²) for weights and embeddings, zero biases, and the projections that
write into the residual stream (attention output, MLP output) scaled by 1/sqrt(2 · n_layers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

INIT_STD = 0.02
"""GPT-2's weight and embedding standard deviation."""


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one qkv ``nn.Linear``, SDPA with ``is_causal``, one output ``nn.Linear``."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model = {d_model} must be a multiple of n_heads = {n_heads}.")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [N, heads, T, d/heads]
        return self.out(y.transpose(1, 2).reshape(n, t, d))


class MLP(nn.Module):
    """Position-wise feed-forward: Linear(d, 4d), GELU, Linear(4d, d)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class CharTransformer(nn.Module):
    """Decoder-only transformer: token + learned position embeddings, pre-LN blocks, final LN, linear head."""

    def __init__(self, vocab_size: int, context: int, n_layers: int = 2, d_model: int = 128, n_heads: int = 4):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_final = nn.LayerNorm(d_model)
        # Its own weight, not self.tok.weight: raygd's exact per-example norms refuse shared parameters.
        self.head = nn.Linear(d_model, vocab_size)
        self._init_weights(n_layers)

    def _init_weights(self, n_layers: int) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=INIT_STD)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.modules():  # the residual-stream writers: GPT-2's 1/sqrt(2L)
            if isinstance(block, Block):
                for layer in (block.attn.out, block.mlp.proj):
                    nn.init.normal_(layer.weight, std=INIT_STD / math.sqrt(2 * n_layers))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [N, T] (T <= context) -> logits [N, T, vocab_size]."""
        t = ids.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the model's context {self.context}.")
        # Positions as arange(T)[None], shape [1, T]: raygd's per-example norms read ids with a leading 1 as
        # shared by the batch, never as one id per example (which 1-D ids of length N could be).
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device)[None])
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_final(x))


def build(
    input_shape: tuple[int, ...], num_classes: int, *, n_layers: int = 2, d_model: int = 128, n_heads: int = 4
) -> CharTransformer:
    """raygd's model factory (``train.model: examples.charlm.model:build``).

    Args:
        input_shape: ``(T,)``, the sequence length of one example; the model's context is T.
        num_classes: the vocabulary size C (logits per position).
        n_layers, d_model, n_heads: ``train.model_args``; d_model must be a multiple of n_heads.

    Returns:
        A ``CharTransformer`` mapping ids [N, T] to logits [N, T, C].
    """
    if len(input_shape) != 1 or int(input_shape[0]) < 1:
        raise ValueError(f"input_shape = {tuple(input_shape)} is invalid: one sequence length (T,) of token ids.")
    return CharTransformer(num_classes, int(input_shape[0]), n_layers=n_layers, d_model=d_model, n_heads=n_heads)
