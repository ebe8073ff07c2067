"""Hugging Face interop: a checkpoint written as a transformers GPT-2 directory, and one read back.

Configs and weights are converted here; the tokenizer files are hf_tokenizer.py's job.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import Config, DataConfig, ModelConfig, TrainConfig
from ..errors import CheckpointError, InteropError
from ..model import GPT
from ..version import __version__
from .hf_tokenizer import load_any_tokenizer, read_hf_tokenizer, write_hf_tokenizer

# GPT-2's Conv1D layers hold weights as (in, out); nn.Linear holds (out, in).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# transformers' name -> ours for GELU. "gelu" is the exact (erf) form, the others the tanh one.
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
# Old GPT-2 files also hold each layer's causal mask as a buffer ("h.0.attn.bias"): not a weight.
MASK_BUFFER = re.compile(r"(^|\.)h\.\d+\.attn\.(masked_)?bias$")
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, and GPT-2's


@dataclass
class ExportResult:
    """Where the export went, and what the user should know about it (printed by the CLI)."""

    out_dir: Path
    tokenizer_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Configs


def check_exportable(config: ModelConfig, target: str = "Hugging Face GPT-2") -> None:
    """Refuse, naming the option, a model that GPT-2's architecture cannot express (in `target`'s words).

    Only the classic architecture has a GPT-2 equivalent: learned positions, LayerNorm, GELU.
    """
    if config.model_type != "gpt":
        raise InteropError(f"only GPT models export to {target}, not model_type {config.model_type!r}")
    refused = [
        ("norm", config.norm != "layernorm", "GPT-2 uses LayerNorm"),
        ("position", config.position != "learned", "GPT-2 uses learned position embeddings"),
        ("qk_norm", config.qk_norm, "GPT-2 does not normalise queries and keys"),
        ("activation", config.activation not in ("gelu", "gelu_tanh"), "GPT-2 uses GELU"),
        ("embed_norm", config.embed_norm, "GPT-2 does not normalise its embedding"),
        ("logit_softcap", config.logit_softcap > 0, "GPT-2 does not cap its logits"),
        ("bigram_embed", config.bigram_embed, "GPT-2 has no embedding of token pairs"),
    ]
    for name, bad, why in refused:
        if bad:
            raise InteropError(
                f"cannot export to {target}: {name}={getattr(config, name)!r} has no GPT-2 equivalent "
                f"({why}); only the classic architecture exports"
            )


def gpt2_config(config: ModelConfig, bos_eos_id: int | None = None) -> dict[str, Any]:
    """The `config.json` of the GPT2LMHeadModel equivalent to `config`."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.mlp_hidden or None,  # None means 4 * n_embd there too
        # transformers' "gelu" is torch's exact erf GELU; "gelu_new" is GPT-2's tanh formula.
        "activation_function": "gelu_new" if config.activation == "gelu_tanh" else "gelu",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": config.tie_weights,
        "bos_token_id": bos_eos_id,
        "eos_token_id": bos_eos_id,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def model_config_from_gpt2(hf: dict[str, Any], where: Path) -> ModelConfig:
    """Our ModelConfig for a GPT-2 `config.json`, refusing options our model does not have."""
    def refuse(option: str, value: Any, why: str) -> InteropError:
        return InteropError(f"cannot import {where}: {option}={value!r} is not supported ({why})")

    if hf.get("model_type") != "gpt2":
        raise refuse("model_type", hf.get("model_type"), "only GPT-2 models import")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in HF_ACTIVATIONS:
        raise refuse("activation_function", activation, f"use one of {sorted(HF_ACTIVATIONS)}")
    for option, wanted, why in (
        ("scale_attn_weights", True, "attention must divide by sqrt(head size)"),
        ("scale_attn_by_inverse_layer_idx", False, "attention must not be scaled per layer"),
        ("add_cross_attention", False, "a decoder-only model has no cross-attention"),
    ):
        if bool(hf.get(option, wanted)) != wanted:
            raise refuse(option, hf.get(option), why)
    eps = float(hf.get("layer_norm_epsilon", LAYER_NORM_EPS))
    if not math.isclose(eps, LAYER_NORM_EPS, rel_tol=1e-6):
        raise refuse("layer_norm_epsilon", eps, f"our LayerNorm uses {LAYER_NORM_EPS}")
    try:
        return ModelConfig(
            model_type="gpt",
            vocab_size=int(hf["vocab_size"]),
            block_size=int(hf.get("n_positions", 1024)),
            n_layer=int(hf.get("n_layer", 12)),
            n_head=int(hf.get("n_head", 12)),
            n_embd=int(hf.get("n_embd", 768)),
            mlp_hidden=int(hf.get("n_inner") or 0),
            dropout=float(hf.get("resid_pdrop", 0.1)),
            bias=True,  # GPT-2 always has biases
            tie_weights=bool(hf.get("tie_word_embeddings", True)),
            activation=HF_ACTIVATIONS[activation],
        )
    except (KeyError, TypeError, ValueError) as exc:  # ConfigError is a ValueError too
        raise InteropError(f"cannot import {where}: config.json is not a usable GPT-2 config ({exc})") from None


# ---------------------------------------------------------------------------------------------
# Weights
#
# Our parameter names already follow GPT-2's; two things differ. GPT-2 stores its four
# projection matrices as `Conv1D` weights, (in, out), where `nn.Linear` keeps (out, in), so
# those are transposed. And GPT-2 always has biases, so a `bias=False` model exports zeros.


def to_gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """GPT-2 tensors (float32, Conv1D layout, zero biases where ours has none) for a GPT model."""
    config = model.config
    ours = {name: t.detach().float().cpu() for name, t in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in ours.items():
        if name == "lm_head.weight" and config.tie_weights:
            continue  # tied: transformers rebuilds it from wte
        out[name] = tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor
    if not config.bias:  # GPT-2 has a bias beside every Linear and LayerNorm weight
        for name in list(out):
            if name.endswith(".weight") and name.startswith(("transformer.h.", "transformer.ln_f")):
                width = out[name].shape[1] if name.endswith(CONV1D_WEIGHTS) else out[name].shape[0]
                out[name[: -len("weight")] + "bias"] = torch.zeros(width)
    return {name: t.contiguous() for name, t in out.items()}


def from_gpt2_state_dict(tensors: dict[str, torch.Tensor], config: ModelConfig, where: Path) -> dict[str, torch.Tensor]:
    """Our GPT's state dict from GPT-2 tensors, with or without the `transformer.` prefix."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if MASK_BUFFER.search(name):
            continue
        key = name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name
        tensor = tensor.float()
        state[key] = tensor.t() if key.endswith(CONV1D_WEIGHTS) else tensor
    if config.tie_weights:
        state["lm_head.weight"] = state.get("transformer.wte.weight")  # as transformers does, ignore a stored head
    expected = _expected_shapes(config)
    missing = sorted(set(expected) - {k for k, v in state.items() if v is not None})
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise InteropError(
            f"cannot import {where}: the weights do not match config.json "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise InteropError(f"cannot import {where}: {name} has shape {tuple(state[name].shape)}, config.json implies {shape}")
    return state


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of our GPT for `config`, without allocating the model."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in GPT(config).state_dict().items()}


def read_gpt2_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers model directory: safetensors first, else pytorch_model.bin."""
    def shards(index_name: str) -> list[Path] | None:
        index = directory / index_name
        if not index.is_file():
            return None
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise InteropError(f"cannot read the weight index {index}: {exc}") from None
        inside = directory.resolve()
        for name in names:  # a shard is a file of this directory, never a path out of it
            if not isinstance(name, str) or inside not in (directory / name).resolve().parents:
                raise InteropError(f"the weight index {index} names {name!r}, which is not a file in {directory}")
        return [directory / name for name in names]

    candidates = [
        shards("model.safetensors.index.json") or ([directory / "model.safetensors"] if (directory / "model.safetensors").is_file() else None),
        shards("pytorch_model.bin.index.json") or ([directory / "pytorch_model.bin"] if (directory / "pytorch_model.bin").is_file() else None),
    ]
    files = next((c for c in candidates if c), None)
    if not files:
        raise InteropError(f"cannot import {directory}: no model.safetensors or pytorch_model.bin in it")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                tensors.update(load_file(str(path)))
            else:  # weights_only: tensors and plain containers only, no code runs
                tensors.update(torch.load(path, map_location="cpu", weights_only=True))
        except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as exc:
            raise InteropError(f"cannot read weights {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return tensors


# ---------------------------------------------------------------------------------------------
# The two directions
#
# Neither direction needs `transformers`: both read and write the files directly (safetensors,
# JSON, and `torch.load(weights_only=True)` for old `pytorch_model.bin` files), so nothing is
# pickled and no code from the directory runs. Install the `hf` extra to load the result in
# transformers.


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


EXPORT_TITLE = "# A scratchgpt model in Hugging Face GPT-2 format"  # the first line of every export's README.md


def _prepare_empty_dir(out: Path, overwrite: bool, source: Path) -> None:
    """Make `out` an empty directory. With `overwrite`, only an earlier export of ours is replaced: never the source
    checkpoint or a folder holding it, never a folder of other files."""
    refuse_to_cover(out, source)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise InteropError(f"{out} already exists and is not empty; choose another --out or pass --overwrite to replace it")
        if not _is_our_export(out):
            raise InteropError(f"{out} was not written by scratchgpt export (its README.md does not say so), so "
                               "--overwrite leaves it alone; choose another --out or remove it yourself")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _is_our_export(out: Path) -> bool:
    try:
        return out.is_dir() and (out / "README.md").read_text(encoding="utf-8").startswith(EXPORT_TITLE)
    except (OSError, UnicodeDecodeError):
        return False


def refuse_to_cover(out: Path, source: Path) -> None:
    """Refuse an --out that is the source, holds it, or lies inside it: writing there would destroy it."""
    out_abs, source_abs = out.expanduser().resolve(), source.expanduser().resolve()
    if out_abs == source_abs or out_abs in source_abs.parents or source_abs in out_abs.parents:
        raise InteropError(f"--out {out} would overwrite the model being converted ({source}); choose another --out")


def export_hf(checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False) -> ExportResult:
    """Write `checkpoint` as a directory that `GPT2LMHeadModel.from_pretrained` loads, with the same logits.

    The directory holds `config.json`, `model.safetensors`, a tokenizer where one can be written,
    and a README.md.
    """
    model, tokenizer, config, meta = load_checkpoint(checkpoint)
    check_exportable(config.model)
    out = Path(out_dir)
    _prepare_empty_dir(out, overwrite, Path(checkpoint))
    result = ExportResult(out)
    try:
        files, notes, end_id = write_hf_tokenizer(tokenizer, out, config.model.block_size)
        result.tokenizer_files, result.notes = files, notes
    except InteropError as exc:
        end_id = None
        result.notes.append(f"no tokenizer written: {exc}")
    _write_json(out / "config.json", gpt2_config(config.model, end_id))
    save_file(to_gpt2_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "README.md").write_text(_export_readme(checkpoint, config, meta, result), encoding="utf-8")
    return result


def _export_readme(checkpoint: str | Path, config: Config, meta: dict[str, Any], result: ExportResult) -> str:
    m = config.model
    where = str(result.out_dir)
    lines = [
        EXPORT_TITLE,
        "",
        f"Exported by scratchgpt {__version__} from `{checkpoint}` (step {meta.get('step', '?')}): "
        f"{m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, context {m.block_size}, vocabulary {m.vocab_size}.",
        "",
        "```python",
        "from transformers import AutoTokenizer, GPT2LMHeadModel",
        f"model = GPT2LMHeadModel.from_pretrained({where!r})",
    ]
    if result.tokenizer_files:
        lines += [f"tokenizer = AutoTokenizer.from_pretrained({where!r})",
                  "ids = tokenizer(\"ROMEO:\", return_tensors=\"pt\").input_ids",
                  f"out = model.generate(ids, max_new_tokens={max(1, m.block_size // 2)}, do_sample=True, top_k=40)",
                  "print(tokenizer.decode(out[0]))"]
    lines += ["```", "",
              f"The model sees at most {m.block_size} tokens (`n_positions`), prompt and continuation together: "
              "transformers' `generate` does not crop a longer context, so keep within it.", ""]
    if m.bias is False:
        lines += ["The scratchgpt model had no biases; GPT-2 always has them, so they are stored as zeros.", ""]
    for note in result.notes:
        lines += [f"Note: {note}.", ""]
    lines += [f"Back to scratchgpt: `scratchgpt import --format hf --from {where} --out CHECKPOINT`.", ""]
    return "\n".join(lines)


def import_hf(source: str | Path, out: str | Path, tokenizer_path: str | Path | None = None,
              overwrite: bool = False) -> Path:
    """Convert a GPT2LMHeadModel directory into a scratchgpt checkpoint directory at `out`.

    The directory may come from the Hub or from `save_pretrained`; the checkpoint is an ordinary
    one, which `sample`, `eval` and `train --init-from` use.
    The tokenizer comes from `tokenizer_path` if given (a scratchgpt tokenizer.json, checkpoint,
    or an HF tokenizer directory), else from the tokenizer files in `source`.
    """
    src = Path(source).expanduser()
    if not (src / "config.json").is_file():
        raise InteropError(f"{src} is not a Hugging Face model directory (no config.json in it)")
    try:
        hf_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InteropError(f"cannot read {src / 'config.json'}: {exc}") from None
    model_config = model_config_from_gpt2(hf_config, src)
    tokenizer = load_any_tokenizer(Path(tokenizer_path).expanduser()) if tokenizer_path else read_hf_tokenizer(src)
    if tokenizer is None:
        raise InteropError(f"{src} holds no tokenizer (tokenizer.json); pass --tokenizer FILE with the vocabulary the model was trained on")
    if tokenizer.vocab_size != model_config.vocab_size:
        raise InteropError(f"the tokenizer has {tokenizer.vocab_size} tokens but {src / 'config.json'} says vocab_size "
                           f"{model_config.vocab_size}; pass the model's own tokenizer")
    state = from_gpt2_state_dict(read_gpt2_weights(src), model_config, src)
    model = GPT(model_config)
    model.load_state_dict(state)
    config = Config(model=model_config, train=TrainConfig(), data=DataConfig(tokenizer=tokenizer.to_dict()["type"]))
    target = Path(out).expanduser()
    refuse_to_cover(target, src)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        if not overwrite:
            raise InteropError(f"{target} already exists and is not empty; choose another --out or pass --overwrite to replace it")
        if not (target / "meta.json").is_file():
            raise InteropError(f"{target} is not a scratchgpt checkpoint, so --overwrite leaves it alone; choose "
                               "another --out or remove it yourself")
    try:
        save_checkpoint(target, model, tokenizer, config, {"step": 0, "imported_from": str(src)})
    except CheckpointError as exc:
        raise InteropError(str(exc)) from None
    return target


