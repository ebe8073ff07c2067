"""Typed configuration: what the model is, how it trains, and which text it reads.

A run is described by one `Config` made of three dataclasses. Presets are JSON files in
`scratchgpt/presets/`; the command line overrides any field (`--n-layer 6 --lr 3e-4`).
Every dataclass validates itself in `__post_init__`, so an invalid value is refused with a
one-line message before any work starts.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .tokenizer import TOKENIZER_KINDS

MODEL_TYPES = ("gpt", "bigram")
ATTENTION_IMPLS = ("sdpa", "manual")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu2", "swiglu")
OPTIMIZERS = ("adamw", "muon")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LR_SCHEDULES = ("cosine", "wsd")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    """Shape of the network. `vocab_size` is filled in from the tokenizer at training time."""

    model_type: str = "gpt"
    vocab_size: int = 0
    block_size: int = 64  # context length in tokens
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_hidden: int = 0  # MLP width; 0 means the GPT-2 default of 4 * n_embd
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm layers
    tie_weights: bool = True  # share the token embedding with the LM head
    attention: str = "sdpa"  # "sdpa" (fused kernel) or "manual" (the textbook formula)
    # Options beyond GPT-2, used by the speedrun preset; the defaults keep the classic model.
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    position: str = "learned"  # "learned" position embeddings, or "rope" (rotary, in attention)
    rope_base: float = 10000.0
    qk_norm: bool = False  # RMS-normalise queries and keys per head before attention
    # MLP nonlinearity: "gelu" (exact, erf), "gelu_tanh" (GPT-2's tanh approximation),
    # "relu2" (squared ReLU) or "swiglu"
    activation: str = "gelu"
    zero_init_proj: bool = False  # start every residual branch's output projection at zero
    zero_init_head: bool = False  # start the LM head at zero: every first prediction is uniform
    embed_norm: bool = False  # RMS-normalise the token embedding before the first block
    logit_softcap: float = 0.0  # squash logits into (-cap, cap) with cap * tanh(logits / cap); 0: off
    bigram_embed: bool = False  # add an embedding of each (previous token, token) pair to the token embedding

    def __post_init__(self) -> None:
        _require(self.model_type in MODEL_TYPES, f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        _require(self.attention in ATTENTION_IMPLS, f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        _require(self.vocab_size >= 0, f"vocab_size must be >= 0, got {self.vocab_size}")
        _require(self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}")
        _require(self.n_layer >= 1, f"n_layer must be >= 1, got {self.n_layer}")
        _require(self.n_head >= 1, f"n_head must be >= 1, got {self.n_head}")
        _require(self.n_embd >= 1, f"n_embd must be >= 1, got {self.n_embd}")
        _require(
            self.n_embd % self.n_head == 0,
            f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
            f"try --n-embd {self.n_head * max(1, round(self.n_embd / self.n_head))}",
        )
        _require(self.mlp_hidden >= 0, f"mlp_hidden must be >= 0 (0 means 4 * n_embd), got {self.mlp_hidden}")
        _require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _require(self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}")
        _require(self.position in POSITIONS, f"position must be one of {POSITIONS}, got {self.position!r}")
        _require(self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        _require(self.position != "rope" or self.head_size % 2 == 0,
                 f"rope needs an even head size, but n_embd / n_head = {self.n_embd / self.n_head:g}")
        _require(self.rope_base > 1, f"rope_base must be > 1, got {self.rope_base}")
        _require(self.logit_softcap >= 0, f"logit_softcap must be >= 0 (0 turns it off), got {self.logit_softcap}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        return self.mlp_hidden or 4 * self.n_embd

    def beyond_gpt2(self) -> list[str]:
        """The options set away from GPT-2's, which the modern model (modern.py) builds."""
        return [name for name, used in (("rmsnorm", self.norm != "layernorm"), ("rope", self.position != "learned"),
                                        ("qk_norm", self.qk_norm), (self.activation, self.activation in ("relu2", "swiglu")),
                                        ("zero_init_proj", self.zero_init_proj), ("zero_init_head", self.zero_init_head),
                                        ("embed_norm", self.embed_norm), ("logit_softcap", self.logit_softcap > 0),
                                        ("bigram_embed", self.bigram_embed)) if used]


# What a checkpoint's weights leave free when a run resumes or fine-tunes from it: the rest is its shape.
FREE_MODEL_FIELDS = ("dropout", "attention")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping: schedule, batch, evaluation, checkpoints, hardware."""

    batch_size: int = 12
    grad_accum_steps: int = 1
    max_steps: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    lr_decay_steps: int = 0  # the decay reaches min_lr here; 0 means max_steps
    lr_schedule: str = "cosine"  # "cosine", or "wsd": warmup, stable, then linear decay over decay_fraction
    decay_fraction: float = 0.4  # wsd only: the share of the run spent decaying
    time_budget: float = 0.0  # seconds of wall clock for the whole run; the schedule follows time. 0: off
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_interval: int = 250
    eval_iters: int = 20  # batches per split in the periodic loss estimate
    sample_tokens: int = 200  # length of the sample printed at each evaluation; 0 disables
    save_every: int = 0  # also keep a checkpoint every N steps; 0 disables
    keep_checkpoints: int = 3  # how many of those periodic checkpoints to keep; 0 keeps all
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"  # autocast dtype: auto picks bfloat16 where the hardware has it
    compile: bool = False  # torch.compile the model
    trust_device: bool = False  # skip the check that an accelerator computes what the CPU computes
    threads: int = 0  # CPU threads for PyTorch's kernels during the run; 0 keeps PyTorch's default (one per core)
    optimizer: str = "adamw"  # "adamw", or "muon": Muon for the blocks' matrices, AdamW for the rest
    muon_lr: float = 0.02  # Muon's learning rate at the top of the schedule (follows the same schedule)
    muon_momentum: float = 0.95
    muon_momentum_warmup: int = 0  # steps over which Muon's momentum rises from 0.85 to muon_momentum; 0: none
    muon_polar_express: bool = False  # Muon orthogonalises with Polar Express's coefficients, one set per step
    embed_lr: float = 0.0  # peak learning rate of the embedding tables (follows the schedule); 0: learning_rate
    head_lr: float = 0.0  # peak learning rate of the untied LM head (follows the schedule); 0: learning_rate
    # Fine-tuning: a checkpoint whose weights and tokenizer start this run. The model's shape
    # comes from it (only dropout and attention are taken from this config). "": from scratch.
    init_from: str = ""
    tensorboard: bool = False  # also write the metrics and samples as TensorBoard events under RUN/tensorboard
    # LoRA (lora.py): freeze the init_from weights and train a rank-r update of the target layers. 0: off.
    lora_rank: int = 0
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_rank
    lora_targets: str = "c_attn,c_proj,c_fc"  # comma-separated names of the linear layers that get one

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum_steps", "eval_interval", "eval_iters"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "lr_decay_steps", "sample_tokens", "save_every", "keep_checkpoints", "threads",
                     "muon_momentum_warmup"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("learning_rate", "min_lr", "embed_lr", "head_lr"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value >= 0, f"{name} must be a finite number >= 0, got {value}")
        _require(self.min_lr <= self.learning_rate, f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})")
        _require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        _require(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables it), got {self.grad_clip}")
        _require(self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        _require(0.0 < self.decay_fraction <= 1.0, f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        _require(self.time_budget >= 0, f"time_budget must be >= 0 seconds (0 turns it off), got {self.time_budget}")
        _require(self.max_steps > 0 or self.time_budget > 0, "max_steps must be > 0 unless a --time-budget ends the run")
        _require(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        _require(not self.muon_polar_express or self.optimizer == "muon", "muon_polar_express changes Muon: use it with --optimizer muon")
        _require(self.muon_lr > 0 and 0 <= self.muon_momentum < 1, f"muon_lr must be > 0 and muon_momentum in [0, 1), got {self.muon_lr}, {self.muon_momentum}")
        _require(self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}")
        _require(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _require(self.lora_rank >= 0, f"lora_rank must be >= 0 (0 turns LoRA off), got {self.lora_rank}")
        _require(math.isfinite(self.lora_alpha) and self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        _require(not self.lora_rank or bool(self.init_from), "LoRA fine-tunes a trained model: give it one with --init-from (or sft --checkpoint)")
        _require(all(t.strip() for t in self.lora_targets.split(",")), f"lora_targets must be comma-separated layer names, got {self.lora_targets!r}")

    @property
    def lora_target_names(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(","))

    @property
    def decay_steps(self) -> int:
        return self.lr_decay_steps or self.max_steps

    @property
    def step_limit(self) -> float:
        """The step count that ends the run: max_steps, or none when only a time budget ends it."""
        return self.max_steps or math.inf


@dataclass
class DataConfig:
    """Which text to train on and how to cut it into tokens."""

    path: str = ""  # a text file, a directory of them, or a glob; empty means Tiny Shakespeare (shipped with the package)
    tokenizer: str = "char"  # "char" (one token per character), "byte" (per UTF-8 byte) or "bpe" (byte-level BPE)
    val_fraction: float = 0.1  # the last 10% of the characters validate
    vocab_size: int = 1024  # bpe only: tokens in the learned vocabulary (256 bytes + merges)
    encoding: str = "utf-8"  # the files' text encoding (a Python codec name)
    skip_bad_files: bool = False  # leave out files that are not text in `encoding`, instead of refusing them
    chat: bool = False  # conversations for supervised fine-tuning (chat/): JSONL files at `path`, or the built-in set

    def __post_init__(self) -> None:
        _require(self.tokenizer in TOKENIZER_KINDS, f"tokenizer must be one of {TOKENIZER_KINDS}, got {self.tokenizer!r}")
        _require(0.0 < self.val_fraction < 1.0, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        _require(self.tokenizer != "bpe" or 256 <= self.vocab_size <= 2**20,
                 f"vocab_size must be at least 256 (the byte symbols) and at most {2**20} for bpe, got {self.vocab_size}")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ConfigError(f"unknown text encoding {self.encoding!r}; use a Python codec name such as utf-8, latin-1 or cp1252") from None


@dataclass
class Config:
    """Everything that defines a training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        return cls(
            model=_build(ModelConfig, d.get("model", {}), "model"),
            train=_build(TrainConfig, d.get("train", {}), "train"),
            data=_build(DataConfig, d.get("data", {}), "data"),
        )


SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}

# What each field does, in a few words, for its --help line; docs/training.md says why at length.
# A test checks that every field has one. No "%": argparse formats help strings.
FIELD_HELP: dict[str, dict[str, str]] = {
    "model": {
        "model_type": '"gpt" (the transformer) or "bigram" (a next-token table, the baseline)',
        "vocab_size": "number of token ids; filled in from the tokenizer",
        "block_size": "context length in tokens",
        "n_layer": "transformer blocks stacked",
        "n_head": "attention heads per block; must divide --n-embd",
        "n_embd": "width of the residual stream (the embedding size)",
        "mlp_hidden": "MLP inner width; 0: 4 x n_embd",
        "dropout": "probability of zeroing an activation during training",
        "bias": "biases in Linear and LayerNorm layers",
        "tie_weights": "share the token embedding with the LM head",
        "attention": '"sdpa" (PyTorch\'s fused kernel) or "manual" (the textbook formula)',
        "norm": '"layernorm" (GPT-2) or "rmsnorm"',
        "position": '"learned" position embeddings, or "rope" (rotary, in attention)',
        "rope_base": "RoPE's frequency base (with --position rope)",
        "qk_norm": "RMS-normalise queries and keys per head before attention",
        "activation": 'MLP nonlinearity: "gelu", "gelu_tanh" (GPT-2\'s), "relu2" or "swiglu"',
        "zero_init_proj": "start every residual branch's output projection at zero",
        "zero_init_head": "start the LM head at zero, so that every first prediction is uniform (modded-nanogpt)",
        "embed_norm": "RMS-normalise the token embedding before the first block (modded-nanogpt)",
        "bigram_embed": "add an embedding of each (previous token, token) pair to the token embedding: an exact bigram table (modded-nanogpt hashes the pairs); small vocabularies only",
        "logit_softcap": "squash the logits into (-cap, cap) with cap * tanh(logits / cap) (Gemma 2, modded-nanogpt); 0: off",
    },
    "train": {
        "batch_size": "training windows per step (per process)",
        "grad_accum_steps": "micro-batches per optimizer step",
        "max_steps": "optimizer steps in the run; 0 only with --time-budget",
        "learning_rate": "peak learning rate, reached after warmup",
        "min_lr": "learning rate at the end of the decay",
        "warmup_steps": "steps of linear warmup up to --lr",
        "lr_decay_steps": "step at which the decay reaches --min-lr; 0: --max-steps",
        "lr_schedule": '"cosine", or "wsd" (warmup, stable, then linear decay)',
        "decay_fraction": "wsd only: the share of the run spent decaying",
        "time_budget": "seconds of wall clock for the whole run, the schedule following time; 0: off",
        "weight_decay": "AdamW's weight decay, on matrices only",
        "beta1": "Adam's decay of the running mean of gradients",
        "beta2": "Adam's decay of the running mean of squared gradients",
        "grad_clip": "largest global gradient norm; 0: no clipping",
        "eval_interval": "steps between loss estimates (and samples, metrics.jsonl rows, saves of last/)",
        "eval_iters": "batches per split in each loss estimate",
        "sample_tokens": "length of the sample printed at each evaluation; 0: none",
        "save_every": "also keep a checkpoint every N steps; 0: off",
        "keep_checkpoints": "how many of those periodic checkpoints to keep; 0: all",
        "seed": "seed of every random generator: same seed and config, same run",
        "device": '"auto" (CUDA, then MPS, then CPU), "cpu", "cuda" or "mps"',
        "dtype": 'autocast dtype: "auto" (bfloat16 where the hardware has it), "float32", "bfloat16" or "float16"',
        "compile": "run the model through torch.compile",
        "threads": "CPU threads for PyTorch's kernels; 0 (default): adapt to the cores other programs leave free",
        "optimizer": '"adamw", or "muon" (Muon for the blocks\' matrices, AdamW for the rest)',
        "muon_lr": "Muon's peak learning rate (follows the same schedule)",
        "muon_momentum": "Muon's Nesterov momentum",
        "muon_momentum_warmup": "steps over which Muon's momentum rises linearly from 0.85 to muon_momentum (modded-nanogpt); 0: constant",
        "muon_polar_express": "Muon orthogonalises with Polar Express's five per-step coefficients (Amsel et al., 2025; modded-nanogpt, nanochat) instead of one Newton-Schulz quintic",
        "embed_lr": "peak learning rate of the token (and position) embeddings, on the same schedule (nanochat trains them faster than the rest); 0: --lr",
        "head_lr": "peak learning rate of the untied LM head, on the same schedule (nanochat trains it slower than the rest); 0: --lr",
        "init_from": 'checkpoint whose weights and tokenizer start this run (fine-tuning); "": from scratch',
        "trust_device": "train on a GPU or MPS device even if its float32 pass over a fixed batch disagrees with the CPU's (checked before training)",
        "tensorboard": "also write every metrics row (losses, learning rate, gradient norm, tokens/s) and the samples as TensorBoard events under RUN/tensorboard (needs the tensorboard extra)",
        "lora_rank": "LoRA: freeze the --init-from weights and train a rank-r update of the target layers; 0: off (train every weight)",
        "lora_alpha": "LoRA: the update is scaled by lora_alpha / lora_rank",
        "lora_targets": "LoRA: comma-separated names of the linear layers that get an update (c_attn, c_proj, c_fc)",
    },
    "data": {
        "path": 'a text file, a directory of them, or a glob; "": Tiny Shakespeare',
        "tokenizer": '"char" (one token per character), "byte" (per UTF-8 byte) or "bpe" (learned byte-level BPE)',
        "val_fraction": "share of the text, taken from its end, held out for validation",
        "vocab_size": "bpe only: tokens in the learned vocabulary (256 bytes + merges)",
        "encoding": "the files' text encoding (a Python codec name)",
        "skip_bad_files": "leave out files that are not text in --encoding, instead of refusing them",
        "chat": "conversations (JSONL) for supervised fine-tuning at --data, or the built-in set (what `scratchgpt sft` sets)",
    },
}


def _build(cls: type, values: dict[str, Any], section: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    _require(not unknown, f"unknown {section} setting(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


def preset_names() -> list[str]:
    """Names of the presets shipped with the package."""
    folder = resources.files("scratchgpt") / "presets"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> dict[str, Any]:
    """The raw preset file: {"description": ..., "model": {...}, "train": {...}}."""
    if name.endswith(".json") or "/" in name:  # a preset file of the user's own
        path = Path(name)
        _require(path.is_file(), f"preset file {name} not found")
        text = path.read_text(encoding="utf-8")
    else:
        _require(name in preset_names(), f"unknown preset {name!r}; choose one of {preset_names()} or pass a .json file")
        text = (resources.files("scratchgpt") / "presets" / f"{name}.json").read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"preset {name} is not valid JSON: {exc}") from None


def config_from_preset(name: str, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Build a Config from a preset, then apply `{"model": {...}, "train": {...}}` overrides."""
    raw = load_preset(name)
    merged = {section: dict(raw.get(section, {})) for section in SECTIONS}
    for section, values in (overrides or {}).items():
        merged[section].update(values)
    return Config.from_dict(merged)
