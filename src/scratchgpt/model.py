"""The classic models, written by hand: a bigram baseline and a GPT-2-style decoder-only transformer.

Read top to bottom: attention (the formula written out, then the fused kernel), the MLP, the
block, the GPT, the bigram. Shapes use B = batch, T = time (tokens), C = n_embd channels,
nh = heads, hs = head size, V = vocabulary. Both models map token ids (B, T) to next-token
logits (B, T, V) and return `(logits, loss)`, the loss being the mean cross-entropy over every
position when targets are given.

Generation may pass a `KVCache` (kv_cache.py): the keys and values of the tokens seen so far,
so that each new token costs one position's work instead of a pass over the whole context.
Training never passes one.

Beside this file: modern.py swaps in the speedrun's parts (RoPE, RMSNorm, QK-norm, ReLU^2,
SwiGLU, zero-initialised projections), kernels.py the fast CPU kernels, and build.py builds
the model a config names. Parameter names follow GPT-2's (`transformer.h.0.attn.c_attn.weight`),
so the weights map one to one onto other GPT-2 implementations.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .errors import ConfigError
from .kv_cache import KVCache


def causal_mask(T: int, S: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, S) booleans, True where query t may attend to key s: the T queries are the last T of the S keys.

    Without a cache T == S and this is the usual lower triangle; with a cache the S - T earlier
    keys come from the cache and every query sees all of them.
    """
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def manual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, training: bool = False,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention written out: softmax(QK^T / sqrt(hs) + mask) @ V, queries (B, nh, T, hs), keys (B, nh, S, hs).

    `mask` (broadcast to (B, nh, T, S), True where a query may look) replaces the causal one.
    """
    T, S, head_size = q.size(-2), k.size(-2), q.size(-1)
    # Scaling q (T x hs) rather than the scores (T x S), and adding the mask below rather than
    # masked_fill on the scores, compile to a faster kernel.
    scores = (q * (1.0 / math.sqrt(head_size))) @ k.transpose(-2, -1)  # (B, nh, T, hs) @ (B, nh, hs, S) -> (B, nh, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif T > 1:  # a single query (a cached decoding step) is the newest token: every key is its past
        # 0 where a token may look (itself and the past), -inf where it may not: after the
        # softmax the future gets zero weight.
        mask = torch.zeros(T, S, dtype=q.dtype, device=q.device).masked_fill(~causal_mask(T, S, q.device), float("-inf"))
        scores = scores + mask
    weights = F.softmax(scores, dim=-1)
    weights = F.dropout(weights, p=dropout_p, training=training)
    return weights @ v  # (B, nh, T, S) @ (B, nh, S, hs) -> (B, nh, T, hs)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position attends to itself and earlier positions."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.use_sdpa = config.attention == "sdpa"  # the fused kernel, or manual_attention above
        self.sdpa = F.scaled_dot_product_attention  # kernels.py may swap in a wrapper that picks the precision
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        # Position of the first of these T tokens: an int, or one per row (B, 1) when a batched
        # server's cache holds sequences of different lengths.
        start = cache.length if cache is not None else 0
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # (B, T, 3C) -> 3 x (B, T, C)
        # (B, T, C) -> (B, T, nh, hs) -> (B, nh, T, hs): each head attends independently
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q, k = self.position_queries_and_keys(q, k, start)
        mask = None
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, T, hs) -> (B, nh, start + T, hs)
            mask = cache.attention_mask  # None: each query sees every cached key and itself
        y = self.attend(q, k, v, start, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))

    def position_queries_and_keys(self, q: torch.Tensor, k: torch.Tensor, start: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The classic model's positions are already in x (learned embeddings); modern.py rotates q and k here."""
        return q, k

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention of T queries at positions start.. over start + T keys (or as `mask` says): (B, nh, T, hs)."""
        dropout_p = self.dropout if self.training else 0.0
        if not self.use_sdpa:
            return manual_attention(q, k, v, dropout_p=dropout_p, training=self.training, mask=mask)
        if mask is not None:
            return self.sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        T = q.size(2)
        if start == 0:  # square: the usual causal triangle
            return self.sdpa(q, k, v, dropout_p=dropout_p, is_causal=True)
        if T == 1:  # one new token sees every cached one: no mask needed
            return self.sdpa(q, k, v, dropout_p=dropout_p)
        # Several new tokens after cached ones (sdpa's is_causal would align the triangle top-left).
        return self.sdpa(q, k, v, attn_mask=causal_mask(T, k.size(2), q.device), dropout_p=dropout_p)


class MLP(nn.Module):
    """Position-wise feed-forward network: widen, GELU, project back."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_width, bias=config.bias)
        # GPT-2 itself used the tanh approximation of GELU; weights imported from it need that one.
        self.gelu = nn.GELU(approximate="tanh" if config.activation == "gelu_tanh" else "none")
        self.c_proj = nn.Linear(config.mlp_width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gelu(self.c_fc(x))  # (B, T, C) -> (B, T, 4C)
        return self.dropout(self.c_proj(h))  # (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """One transformer block, pre-norm: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
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
        if type(self) is GPT and config.beyond_gpt2():
            raise ConfigError(f"GPT is the classic model and has no {', '.join(config.beyond_gpt2())}: "
                              "build this config with scratchgpt.build_model(config)")
        self.config = config
        self.transformer = nn.ModuleDict(self.layers(config))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # The same matrix reads tokens in and writes logits out (Press & Wolf, 2017).
            self.lm_head.weight = self.transformer.wte.weight
        self.init_weights()

    def layers(self, config: ModelConfig) -> dict[str, nn.Module]:
        """The embeddings, the blocks and the final norm, under GPT-2's names."""
        return dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token id -> vector
            wpe=nn.Embedding(config.block_size, config.n_embd),  # position -> vector
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        )

    def init_weights(self) -> None:
        """GPT-2's initialisation: N(0, 0.02) for matrices, zero biases, smaller residual projections."""
        self.apply(_init_linear_and_embedding)
        # Each residual branch's output projection is scaled down so that the sum of
        # 2 * n_layer branches keeps the residual stream's variance near 1 at initialisation.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def embed(self, idx: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """What each token is plus where it is: (B, T) -> (B, T, C)."""
        positions = start + torch.arange(idx.size(1), device=idx.device)  # (T,), or (B, T) for one start per row
        return self.transformer.wte(idx) + self.transformer.wpe(positions)  # (B, T, C) + (T, C) or (B, T, C)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) for tokens idx (B, T), and the loss if targets are given.

        With a cache, idx continues the cached tokens (it sits at positions cache.length...),
        its keys and values are added to the cache, and the logits are for idx's positions only.
        """
        start = cache.length if cache is not None else 0  # an int, or one per row (B, 1)
        end = int(start.max()) + idx.size(1) if torch.is_tensor(start) else start + idx.size(1)
        if end > self.config.block_size:
            raise ValueError(f"sequence of {end} tokens is longer than block_size {self.config.block_size}")
        x = self.transformer.drop(self.embed(idx, start))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)
        if cache is not None:
            cache.advance(idx.size(1))
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, C) -> (B, T, V)
        return logits, lm_loss(logits, targets)


def _init_linear_and_embedding(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


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


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters())
