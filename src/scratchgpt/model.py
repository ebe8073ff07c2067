"""The models: a bigram baseline and a GPT-2-style decoder-only transformer, written by hand.

Shapes use B = batch, T = time (tokens), C = n_embd channels, nh = heads, hs = head size,
V = vocabulary. Both models map token ids (B, T) to next-token logits (B, T, V) and return
`(logits, loss)`, the loss being the mean cross-entropy over every position when targets
are given.

For generation, `GPT.forward` also takes an optional `KVCache`: the keys and values of the
tokens seen so far are kept per layer, so each new token costs one position's work instead of
a pass over the whole context. Training never passes a cache.

Parameter names follow the GPT-2 layout (`transformer.h.0.attn.c_attn.weight`, ...), so the
weights map one to one onto other GPT-2 implementations.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .errors import ConfigError


def causal_mask(T: int, S: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, S) booleans, True where query t may attend to key s: the T queries are the last T of the S keys.

    Without a cache T == S and this is the usual lower triangle; with a cache the S - T earlier
    keys come from the cache and every query sees all of them.
    """
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def manual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """Causal attention written out: softmax(QK^T / sqrt(hs) + mask) @ V, queries (B, nh, T, hs), keys (B, nh, S, hs)."""
    T, S, head_size = q.size(-2), k.size(-2), q.size(-1)
    # Scaling q (T x hs) rather than the scores (T x S), and adding the mask below rather than
    # masked_fill on the scores, compile to a faster kernel (BENCHMARKS.md).
    scores = (q * (1.0 / math.sqrt(head_size))) @ k.transpose(-2, -1)  # (B, nh, T, hs) @ (B, nh, hs, S) -> (B, nh, T, S)
    if T > 1:  # a single query (a cached decoding step) is the newest token: every key is its past
        # 0 where a token may look (itself and the past), -inf where it may not: after the
        # softmax the future gets zero weight.
        mask = torch.zeros(T, S, dtype=q.dtype, device=q.device).masked_fill(~causal_mask(T, S, q.device), float("-inf"))
        scores = scores + mask
    weights = F.softmax(scores, dim=-1)
    weights = F.dropout(weights, p=dropout_p, training=training)
    return weights @ v  # (B, nh, T, S) @ (B, nh, S, hs) -> (B, nh, T, hs)


class Linear(nn.Linear):
    """nn.Linear, with a faster path for the few rows of a cached decoding step on CPU.

    Decoding one token multiplies a single row by every weight matrix: the step streams the
    weights from memory and computes little. PyTorch hands a (1, in) @ (in, out) product to a
    general matrix-multiply kernel that ran at about 10 GB/s here on one thread; the same
    product as a batch of matrix-vector products over the weight's row blocks (`bmm`, which
    splits the batch between threads) ran much faster (benchmarks/bench_matvec.py;
    the figures are in BENCHMARKS.md). Only inference takes the path (no autograd), and only for up to 4 rows,
    beyond which the general kernel catches up. The result equals F.linear up to the order of
    the additions, which `test_linear_row_path_equals_f_linear` checks.
    """

    MAX_ROWS = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows <= self.MAX_ROWS and x.device.type == "cpu" and not torch.is_grad_enabled() and x.dtype == self.weight.dtype:
            parts = row_blocks(self.out_features)
            if parts > 1:
                return rows_times_weight(x, self.weight, self.bias, parts)
        return super().forward(x)


def row_blocks(out_features: int) -> int:
    """Into how many equal row blocks to cut a weight: one per thread if they divide it, else 2, else 1."""
    for parts in (torch.get_num_threads(), 2):
        if parts > 1 and out_features % parts == 0:
            return parts
    return 1


def rows_times_weight(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, parts: int) -> torch.Tensor:
    """x @ weight.T + bias for a few rows x (..., in), as `parts` matrix-vector products in one bmm."""
    out_features, in_features = weight.shape
    rows = x.reshape(-1, in_features)  # (N, in)
    blocks = weight.view(parts, out_features // parts, in_features)  # (p, out/p, in), no copy
    y = torch.bmm(blocks, rows.t().expand(parts, -1, -1))  # (p, out/p, in) @ (p, in, N) -> (p, out/p, N)
    y = y.permute(2, 0, 1).reshape(*x.shape[:-1], out_features)  # (N, p, out/p) -> (..., out)
    return y + bias if bias is not None else y


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated for block_size positions.

    `length` tokens are cached; the next token fed to the model sits at position `length`.
    Each layer writes its new keys and values in place and attends over all cached ones.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, block_size: int, head_size: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (n_layer, batch_size, n_head, block_size, head_size)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.keys.size(1)

    def reset(self) -> None:
        """Forget every cached position (the memory stays allocated)."""
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new (B, nh, T, hs) keys and values; return all of them, (B, nh, length + T, hs)."""
        start, end = self.length, self.length + k.size(2)
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def repeat(self, n: int) -> KVCache:
        """A cache of n copies of this batch-1 cache: one prompt's prefill shared by n continuations."""
        if self.batch_size != 1:
            raise ValueError(f"only a batch-1 cache can be repeated, this one holds {self.batch_size}")
        n_layer, _, n_head, block_size, head_size = self.keys.shape
        copy = KVCache(n_layer, n, n_head, block_size, head_size, self.keys.device, self.keys.dtype)
        copy.keys.copy_(self.keys.expand_as(copy.keys))  # (L, 1, nh, T, hs) -> (L, n, nh, T, hs)
        copy.values.copy_(self.values.expand_as(copy.values))
        copy.length = self.length
        return copy


def make_norm(config: ModelConfig, size: int | None = None) -> nn.Module:
    """LayerNorm (GPT-2) or RMSNorm (scale only, no centring)."""
    size = size or config.n_embd
    if config.norm == "rmsnorm":
        return nn.RMSNorm(size, eps=1e-6)
    return nn.LayerNorm(size, bias=config.bias)


def rope_tables(head_size: int, length: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (length, head_size / 2) for rotary position embeddings (Su et al., 2021).

    Channel pair i of the token at position m turns by the angle m * base^(-2i / head_size):
    fast for the first pairs, slow for the last.
    """
    inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)  # (hs/2,)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[..., i], x[..., i + hs/2]) of (B, nh, T, hs) by its position's angle.

    A rotation keeps every pair's length, and q_m . k_n then depends on m - n only: attention
    sees relative positions.
    """
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]  # (B, nh, T, hs/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # (T, hs/2), broadcast over batch and heads
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position attends to itself and earlier positions."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.use_sdpa = config.attention == "sdpa"
        self.qk_norm = config.qk_norm
        self.use_rope = config.position == "rope"
        if self.use_rope:
            cos, sin = rope_tables(config.head_size, config.block_size, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)  # derived from the config, not saved
            self.register_buffer("rope_sin", sin, persistent=False)
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads at once
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        start = cache.length if cache is not None else 0  # position of the first of these T tokens
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # (B, T, 3C) -> 3 x (B, T, C)
        # (B, T, C) -> (B, T, nh, hs) -> (B, nh, T, hs): each head attends independently
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.qk_norm:  # unit-RMS queries and keys keep attention logits in a tame range
            q = F.rms_norm(q, (q.size(-1),))
            k = F.rms_norm(k, (k.size(-1),))
        if self.use_rope:
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
        if cache is not None:  # keys and values are cached after RoPE, so each is rotated once
            k, v = cache.update(layer, k, v)  # (B, nh, T, hs) -> (B, nh, start + T, hs)
        dropout_p = self.dropout if self.training else 0.0
        in_dtype = q.dtype
        fp32_attention = self.use_sdpa and q.device.type == "cpu" and in_dtype == torch.bfloat16
        if fp32_attention:
            # PyTorch's CPU flash attention is far slower in bfloat16 than in float32 at these
            # sizes (benchmarks/bench_attention.py): attend in float32, return bfloat16.
            q, k, v = q.float(), k.float(), v.float()
        with torch.autocast("cpu", enabled=False) if fp32_attention else nullcontext():
            y = self._attend(q, k, v, start, dropout_p)
        y = y.to(in_dtype).transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, dropout_p: float) -> torch.Tensor:
        """Causal attention of T queries at positions start.. over start + T keys: (B, nh, T, hs)."""
        T = q.size(2)
        if self.use_sdpa:
            if start == 0:  # square: the usual causal triangle
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
            elif T == 1:  # one new token sees every cached one: no mask needed
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            else:  # several new tokens after cached ones (sdpa's is_causal would align the triangle top-left)
                mask = causal_mask(T, k.size(2), q.device)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        else:
            y = manual_attention(q, k, v, dropout_p=dropout_p, training=self.training)
        return y


class MLP(nn.Module):
    """Position-wise feed-forward network: widen, nonlinearity, project back."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.activation = config.activation
        # SwiGLU computes a gate and a value, so its first layer is twice as wide.
        width_out = 2 * config.mlp_width if config.activation == "swiglu" else config.mlp_width
        self.c_fc = Linear(config.n_embd, width_out, bias=config.bias)
        # GPT-2 itself used the tanh approximation of GELU; weights imported from it need that one.
        self.gelu = nn.GELU(approximate="tanh" if config.activation == "gelu_tanh" else "none")
        self.c_proj = Linear(config.mlp_width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, C) -> (B, T, 4C), or (B, T, 8C) for SwiGLU
        if self.activation == "relu2":
            h = F.relu(h).square()
        elif self.activation == "swiglu":
            gate, value = h.chunk(2, dim=-1)  # (B, T, 8C) -> 2 x (B, T, 4C)
            h = F.silu(gate) * value
        else:
            h = self.gelu(h)
        return self.dropout(self.c_proj(h))  # (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """One transformer block, pre-norm: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)  # tokens exchange information
        x = x + self.mlp(self.ln_2(x))  # each token thinks on its own
        return x


class GPT(nn.Module):
    """Token + position embeddings, n_layer blocks, a final LayerNorm and the LM head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size < 1:
            raise ConfigError("vocab_size must be set (from the tokenizer) before building a model")
        self.config = config
        layers = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.position == "learned":  # with RoPE, positions enter inside attention instead
            layers["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        layers.update(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        )
        self.transformer = nn.ModuleDict(layers)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # The same matrix reads tokens in and writes logits out (Press & Wolf, 2017).
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2: each residual branch's output projection is scaled down so that the sum of
        # 2 * n_layer branches keeps the residual stream's variance near 1 at initialisation.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if config.zero_init_proj:  # each block starts as the identity; training grows it
                    nn.init.zeros_(param)
                else:
                    nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) for tokens idx (B, T), and the loss if targets are given.

        With a cache, idx continues the cached tokens (it sits at positions cache.length...),
        its keys and values are added to the cache, and the logits are for idx's positions only.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T) -> (B, T, C)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))  # (B, T, C) + (T, C)
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += T
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, C) -> (B, T, V)
        return logits, lm_loss(logits, targets)

    def new_cache(self, batch_size: int = 1) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to block_size tokens, on the model's device."""
        weight = self.transformer.wte.weight
        c = self.config
        return KVCache(c.n_layer, batch_size, c.n_head, c.block_size, c.head_size, weight.device, weight.dtype)


class Bigram(nn.Module):
    """The baseline: the next token's logits are read from a table row chosen by the current token."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size < 1:
            raise ConfigError("vocab_size must be set (from the tokenizer) before building a model")
        self.config = config
        self.logits_table = nn.Embedding(config.vocab_size, config.vocab_size)  # (V, V)
        # Small weights make every next token equally likely at first: loss = ln(V).
        nn.init.normal_(self.logits_table.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.logits_table(idx)  # (B, T) -> (B, T, V)
        return logits, lm_loss(logits, targets)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
    """Mean next-token cross-entropy over every position, computed in float32."""
    if targets is None:
        return None
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def build_model(config: ModelConfig) -> nn.Module:
    """The model that `config.model_type` names."""
    if config.model_type == "bigram":
        return Bigram(config)
    return GPT(config)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters())
