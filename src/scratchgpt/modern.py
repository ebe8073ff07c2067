"""The speedrun's parts, swapped into the classic GPT (model.py): RoPE, RMSNorm, QK-norm, ReLU^2, SwiGLU,
zero-initialised projections and head, a normalised embedding, an embedding of token pairs (bigrams) and
soft-capped logits. Each is a `ModelConfig` option; build.py picks `ModernGPT`
when a config asks for any of them. The module and parameter names stay GPT-2's, so a
checkpoint's weights load whichever class built them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .errors import ConfigError
from .inference.cache import KVCache
from .model import GPT, MLP, Block, CausalSelfAttention, _init_linear_and_embedding

MAX_BIGRAM_VOCAB = 1023  # bigram_embed's table has (V + 1) * V rows: about a million at most
MAX_BIGRAM_ROWS = (MAX_BIGRAM_VOCAB + 1) * MAX_BIGRAM_VOCAB


def previous_tokens(idx: torch.Tensor, cache: KVCache | None, none: int) -> torch.Tensor:
    """The token before each of idx (B, T); `none` for the first of a window, which training also sees without one.

    Decoding one token at a time, the predecessor is the cache's (cache.py remembers each row's last token)."""
    if cache is not None:
        return cache.previous_tokens(idx, none)
    return F.pad(idx[:, :-1], (1, 0), value=none)


def make_norm(config: ModelConfig) -> nn.Module:
    """LayerNorm (GPT-2) or RMSNorm (scale only, no centring: cheaper, and as good here)."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=1e-6)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


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


class ModernAttention(CausalSelfAttention):
    """Causal self-attention whose queries and keys may be RMS-normalised (QK-norm) and rotated (RoPE)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.qk_norm = config.qk_norm
        self.use_rope = config.position == "rope"
        if self.use_rope:
            cos, sin = rope_tables(config.head_size, config.block_size, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)  # derived from the config, not saved
            self.register_buffer("rope_sin", sin, persistent=False)

    def position_queries_and_keys(self, q: torch.Tensor, k: torch.Tensor,
                                  cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.qk_norm:  # unit-RMS queries and keys keep attention logits in a tame range
            q = F.rms_norm(q, (q.size(-1),))
            k = F.rms_norm(k, (k.size(-1),))
        if self.use_rope:  # before the cache: each key is rotated once, at its own position
            if cache is None:  # training: positions 0..T-1, tables (T, hs/2)
                cos, sin = self.rope_cos[:q.size(2)], self.rope_sin[:q.size(2)]
            else:  # the cache's positions (B or 1, T): tables (B or 1, 1, T, hs/2), shared by the heads
                cos, sin = self.rope_cos[cache.positions].unsqueeze(1), self.rope_sin[cache.positions].unsqueeze(1)
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
        return q, k


class ModernMLP(MLP):
    """The MLP with ReLU^2 (So et al., 2021) or SwiGLU (Shazeer, 2020) in place of GELU."""

    def __init__(self, config: ModelConfig):
        nn.Module.__init__(self)  # not MLP's: SwiGLU's first layer has another width
        self.activation = config.activation
        # SwiGLU computes a gate and a value, so its first layer is twice as wide.
        width_out = 2 * config.mlp_width if config.activation == "swiglu" else config.mlp_width
        self.c_fc = nn.Linear(config.n_embd, width_out, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, C) -> (B, T, 4C), or (B, T, 8C) for SwiGLU
        if self.activation == "swiglu":
            gate, value = h.chunk(2, dim=-1)  # (B, T, 8C) -> 2 x (B, T, 4C)
            h = F.silu(gate) * value
        else:  # relu2
            h = F.relu(h).square()
        return self.dropout(self.c_proj(h))  # (B, T, 4C) -> (B, T, C)


class ModernBlock(Block):
    """The pre-norm block (Block.forward) built from the parts the config names."""

    def __init__(self, config: ModelConfig):
        nn.Module.__init__(self)  # not Block's, which would build the classic parts first
        self.ln_1 = make_norm(config)
        self.attn = ModernAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = ModernMLP(config) if config.activation in ("relu2", "swiglu") else MLP(config)


class ModernGPT(GPT):
    """The GPT of model.py with the modern parts: no position table under RoPE, RMSNorm, zero-init."""

    def layers(self, config: ModelConfig) -> dict[str, nn.Module]:
        layers: dict[str, nn.Module] = {"wte": nn.Embedding(config.vocab_size, config.n_embd)}
        if config.position == "learned":  # with RoPE, positions enter inside attention instead
            layers["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        if config.bigram_embed:  # a vector for each (previous, current) pair; V + 1 predecessors: "none" is the last
            if (config.vocab_size + 1) * config.vocab_size > MAX_BIGRAM_ROWS:
                raise ConfigError(f"bigram_embed needs a table of (V + 1) * V rows; vocab_size {config.vocab_size} is too "
                                  f"large for it (at most {MAX_BIGRAM_VOCAB}): use a character or byte tokenizer")
            layers["bigram"] = nn.Embedding((config.vocab_size + 1) * config.vocab_size, config.n_embd)
        layers.update(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([ModernBlock(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        )
        return layers

    def init_weights(self) -> None:
        if not self.config.zero_init_proj:
            super().init_weights()
        else:
            self.apply(_init_linear_and_embedding)
            for name, param in self.named_parameters():
                if name.endswith("c_proj.weight"):  # each block starts as the identity; training grows it
                    nn.init.zeros_(param)
        if self.config.zero_init_head and not self.config.tie_weights:  # uniform first predictions: loss ln(V)
            nn.init.zeros_(self.lm_head.weight)
        if "bigram" in self.transformer:  # the pairs start adding nothing
            nn.init.zeros_(self.transformer.bigram.weight)

    def embed(self, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        if "wpe" in self.transformer:
            x = super().embed(idx, cache)
        else:
            x = self.transformer.wte(idx)  # (B, T) -> (B, T, C); RoPE adds the positions in attention
        if "bigram" in self.transformer:  # what each token follows, as the pair's own vector
            V = self.config.vocab_size
            before = previous_tokens(idx, cache, none=V)  # (B, T), V for a window's first token
            x = x + self.transformer.bigram(before * V + idx)
        return F.rms_norm(x, (x.size(-1),)) if self.config.embed_norm else x  # unit RMS, no weights

    def output(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(x)  # (B, T, C) -> (B, T, V)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits  # smooth, into (-cap, cap)
