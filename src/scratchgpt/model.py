"""The classic models, written by hand: a bigram baseline and a GPT-2-style decoder-only transformer.

Read top to bottom: attention (the formula written out, then the fused kernel), the MLP, the
block, the GPT, the bigram. Shapes use B = batch, T = time (tokens), C = n_embd channels,
nh = heads, hs = head size, V = vocabulary. Both models map token ids (B, T) to next-token
logits (B, T, V) and return `(logits, loss)`, the loss being the mean cross-entropy over every
position when targets are given.

Generation may pass a `KVCache` (inference/cache.py): the keys and values of the tokens seen so
far, so that each new token costs one position's work instead of a pass over the whole context.
The cache says where the tokens sit (`cache.positions`) and which keys each query may see
(`cache.mask`); without one (training) the positions are 0..T-1 and the mask the causal triangle.
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
from .inference.cache import KVCache


def manual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, training: bool = False,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention written out: softmax(QK^T / sqrt(hs) + mask) @ V, queries (B, nh, T, hs), keys (B, nh, S, hs).

    Without `mask` the attention is causal (T == S, each query sees itself and the queries before
    it); `mask` (broadcast to (B, nh, T, S), True where a query may look) replaces that rule.
    """
    T, S, head_size = q.size(-2), k.size(-2), q.size(-1)
    if mask is None:  # the lower triangle: query t sees keys 0..t
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    # Scaling q (T x hs) rather than the scores (T x S) is the cheaper of the two.
    scores = (q * (1.0 / math.sqrt(head_size))) @ k.transpose(-2, -1)  # (B, nh, T, hs) @ (B, nh, hs, S) -> (B, nh, T, S)
    scores = torch.where(mask, scores, float("-inf"))  # after the softmax, the future gets zero weight
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
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # (B, T, 3C) -> 3 x (B, T, C)
        # (B, T, C) -> (B, T, nh, hs) -> (B, nh, T, hs): each head attends independently
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q, k = self.position_queries_and_keys(q, k, cache)
        mask = None  # causal: each query sees itself and the ones before it
        if cache is not None:
            k, v = cache.update(layer, k, v)  # the keys and values these queries attend over
            mask = cache.mask  # None while prefilling a window, else which cached keys each row may see
        y = self.attend(q, k, v, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))

    def position_queries_and_keys(self, q: torch.Tensor, k: torch.Tensor,
                                  cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The classic model's positions are already in x (learned embeddings); modern.py rotates q and k here."""
        return q, k

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Causal attention of the queries over the keys, or as `mask` says (True where a query may look): (B, nh, T, hs)."""
        dropout_p = self.dropout if self.training else 0.0
        if not self.use_sdpa:
            return manual_attention(q, k, v, dropout_p=dropout_p, training=self.training, mask=mask)
        if mask is None:
            return self.sdpa(q, k, v, dropout_p=dropout_p, is_causal=True)
        return self.sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p)


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

    def embed(self, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """What each token is plus where it is: (B, T) -> (B, T, C)."""
        positions = cache.positions if cache is not None else torch.arange(idx.size(1), device=idx.device)  # (T,), or per row
        return self.transformer.wte(idx) + self.transformer.wpe(positions)  # (B, T, C) + (T, C), or (B or 1, T, C)

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """The next-token logits from the final hidden states: (B, T, C) -> (B, T, V)."""
        return self.lm_head(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) for tokens idx (B, T), and the loss if targets are given.

        With a cache, the tokens sit where the cache says (`cache.positions`), their keys and
        values go into it, and they attend over what it holds; the caller then calls
        `cache.advance()` (inference/engine.py does).
        """
        if idx.size(1) > self.config.block_size:
            raise ValueError(f"sequence of {idx.size(1)} tokens is longer than block_size {self.config.block_size}")
        x = self.transformer.drop(self.embed(idx, cache))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)
        x = self.transformer.ln_f(x)
        logits = self.output(x)  # (B, T, C) -> (B, T, V)
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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V), each from its own token alone: a cache (which the engine passes to every model) changes nothing."""
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
