"""Checkpoints: a directory of plain files, nothing executable, written atomically.

    model.safetensors        the weights (tied tensors stored once); a LoRA checkpoint holds only
                             its adapter, and meta.json names its base checkpoint by path and SHA-256
    config.json              model, train and data config
    tokenizer.json           the vocabulary
    meta.json                format marker, step, losses, versions
    optimizer.safetensors    AdamW moments          } only in training checkpoints:
    optimizer.json           AdamW hyperparameters  } what `train --resume` needs
    train_state.safetensors  RNG states of torch and of the batch sampler
    train_state.json         RNG states of Python and numpy, and the training counters

A checkpoint is first written to a hidden temporary directory, flushed to disk, and then
renamed into place, so a crash during a save leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from .build import build_model
from .config import Config
from .errors import CheckpointError, ConfigError, TokenizerError
from .files import sha256_of
from .lora import adapter_state, add_lora, merge
from .tokenizer import Tokenizer, load_tokenizer, save_tokenizer
from .version import __version__

FORMAT = "scratchgpt-checkpoint"
FORMAT_VERSION = 1
REQUIRED_FILES = ("model.safetensors", "config.json", "tokenizer.json", "meta.json")


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextmanager
def _atomic_directory(target: Path):
    """Yield a temporary directory that replaces `target` only once everything in it is on disk."""
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_save(target)
    for stale in (*target.parent.glob(f".{target.name}.tmp-*"), *target.parent.glob(f".{target.name}.old-*")):
        shutil.rmtree(stale, ignore_errors=True)  # left by a process killed mid-save
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def _optimizer_to_files(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if "parts" in state_dict:  # several optimizers (Muon + AdamW): one prefix each
        tensors, infos = {}, []
        for i, part in enumerate(state_dict["parts"]):
            part_tensors, info = _optimizer_to_files(part)
            tensors.update({f"part{i}.{k}": v for k, v in part_tensors.items()})
            infos.append(info)
        return tensors, {"parts": infos}
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict:
    if "parts" in info:
        parts = []
        for i, part_info in enumerate(info["parts"]):
            prefix = f"part{i}."
            part_tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            parts.append(_optimizer_from_files(part_tensors, part_info))
        return {"parts": parts}
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    for param_id, values in info["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": info["param_groups"]}


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    config: Config,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically. `model` must be the uncompiled module.

    meta.json is written last and lists a SHA-256 of every other file, so a directory with a
    meta.json is complete, and a file damaged later is detected when it is loaded.
    """
    target = Path(directory)
    try:
        with _atomic_directory(target) as tmp:
            if meta.get("lora"):
                save_file(adapter_state(model), str(tmp / "model.safetensors"))
            else:
                save_model(model, str(tmp / "model.safetensors"))
            _write_json(tmp / "config.json", config.to_dict())
            save_tokenizer(tokenizer, tmp / "tokenizer.json")
            if optimizer is not None:
                tensors, info = _optimizer_to_files(optimizer.state_dict())
                save_file(tensors, str(tmp / "optimizer.safetensors"))
                _write_json(tmp / "optimizer.json", info)
            if train_state is not None:
                tensors = {k: v.contiguous() for k, v in train_state.items() if isinstance(v, torch.Tensor)}
                save_file(tensors, str(tmp / "train_state.safetensors"))
                _write_json(tmp / "train_state.json", {k: v for k, v in train_state.items() if not isinstance(v, torch.Tensor)})
            checksums = {p.name: sha256_of(p) for p in sorted(tmp.iterdir())}
            header = {"format": FORMAT, "format_version": FORMAT_VERSION, "scratchgpt_version": __version__}
            _write_json(tmp / "meta.json", {**header, **meta, "sha256": checksums})
    except OSError as exc:
        raise CheckpointError(
            f"could not save checkpoint {target}: {exc.strerror or exc}; the previous checkpoint there is intact"
        ) from None
    return target


def verify_files(directory: Path, meta: dict[str, Any], names: tuple[str, ...]) -> None:
    """Refuse a checkpoint whose files differ from the checksums recorded when it was saved."""
    recorded = meta.get("sha256", {})
    for name in names:
        if name in recorded and sha256_of(directory / name) != recorded[name]:
            raise CheckpointError(f"{directory / name} is corrupted (its SHA-256 differs from the one in meta.json)")


def recover_interrupted_save(target: Path) -> None:
    """If a crash hit between the two renames of a save, put the newest complete copy back in place."""
    if target.exists():
        return
    candidates = sorted(target.parent.glob(f".{target.name}.tmp-*")) + sorted(target.parent.glob(f".{target.name}.old-*"))
    for candidate in candidates:  # a temporary copy with meta.json is complete and newer than the old one
        if (candidate / "meta.json").is_file():
            os.replace(candidate, target)
            return


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its `best/`, else its `last/`)."""
    p = Path(path).expanduser()
    for name in ("best", "last"):
        if p.is_dir():
            recover_interrupted_save(p / name)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist; pass a run directory (from `scratchgpt train --out`) or a checkpoint directory")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p} is not a directory; pass a run directory or a checkpoint directory inside it")
    if (p / "meta.json").is_file():
        return p
    for name in ("best", "last"):
        if (p / name / "meta.json").is_file():
            return p / name
    raise CheckpointError(f"{p} is not a scratchgpt checkpoint or run directory (no meta.json in it, nor in best/ or last/)")


def read_meta(directory: Path) -> dict[str, Any]:
    meta_path = directory / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {meta_path}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} does not describe a scratchgpt checkpoint")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{directory} was written by a newer scratchgpt (format {meta['format_version']}); upgrade scratchgpt")
    return meta


def read_config(directory: Path) -> Config:
    config_path = directory / "config.json"
    try:
        return Config.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, ConfigError, TypeError) as exc:
        raise CheckpointError(f"cannot read {config_path}: {exc}") from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    merge_lora: bool = True) -> tuple[torch.nn.Module, Tokenizer, Config, dict[str, Any]]:
    """Rebuild the model from a checkpoint (no pickle involved). Returns (model, tokenizer, config, meta).

    A LoRA checkpoint is its base checkpoint plus the adapter, merged into plain layers unless
    `merge_lora` is false (resuming its training needs the LoRA layers)."""
    directory = resolve_checkpoint(path)
    for name in REQUIRED_FILES:
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} is incomplete: {name} is missing")
    meta = read_meta(directory)
    verify_files(directory, meta, ("model.safetensors", "config.json", "tokenizer.json"))
    config = read_config(directory)
    try:
        tokenizer = load_tokenizer(directory / "tokenizer.json")
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from None
    if tokenizer.vocab_size != config.model.vocab_size:
        raise CheckpointError(
            f"{directory}: tokenizer.json has {tokenizer.vocab_size} tokens but config.json says vocab_size {config.model.vocab_size}"
        )
    if meta.get("lora"):
        model = _load_lora(directory, meta["lora"], config, merge_lora)
        return model.to(device).eval(), tokenizer, config, meta
    model = build_model(config.model)
    weights = directory / "model.safetensors"
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"cannot read weights {weights}: {str(exc).splitlines()[0]}") from None
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match config.json (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.to(device).eval()
    return model, tokenizer, config, meta


def _load_lora(directory: Path, lora: dict[str, Any], config: Config, merge_lora: bool) -> torch.nn.Module:
    """The base checkpoint `lora` names, checked against its SHA-256, with this checkpoint's adapter."""
    base = Path(str(lora.get("base", "")))
    if not (base / "model.safetensors").is_file():
        raise CheckpointError(f"{directory} is a LoRA adapter for the base checkpoint {base}, which is not there; "
                              "put the base back where it was trained from, or export a merged model")
    if sha256_of(base / "model.safetensors") != lora.get("base_sha256"):
        raise CheckpointError(f"{directory} is a LoRA adapter for {base}, but that checkpoint has changed since "
                              "(its SHA-256 differs from the one in meta.json): the adapter fits only the weights it was trained on")
    model, _, _, _ = load_checkpoint(base)
    tcfg = config.train
    add_lora(model, tcfg.lora_rank, tcfg.lora_alpha, tcfg.lora_target_names, vocab_size=config.model.vocab_size)
    weights = directory / "model.safetensors"
    try:
        adapter = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read the adapter {weights}: {str(exc).splitlines()[0]}") from None
    expected = set(adapter_state(model))
    if set(adapter) != expected:
        raise CheckpointError(f"{weights} does not match its config (expected {sorted(expected)[:2]}..., got {sorted(adapter)[:2]}...)")
    model.load_state_dict(adapter, strict=False)
    return merge(model) if merge_lora else model


def load_training_state(directory: Path) -> tuple[dict, dict[str, Any]]:
    """The optimizer state dict and the train state (RNGs, counters) saved beside the weights."""
    for name in ("optimizer.safetensors", "optimizer.json", "train_state.safetensors", "train_state.json"):
        if not (directory / name).is_file():
            raise CheckpointError(f"cannot resume from {directory}: {name} is missing (it is a weights-only checkpoint)")
    verify_files(directory, read_meta(directory), ("optimizer.safetensors", "optimizer.json", "train_state.safetensors", "train_state.json"))
    try:
        optimizer_state = _optimizer_from_files(
            load_file(str(directory / "optimizer.safetensors")),
            json.loads((directory / "optimizer.json").read_text(encoding="utf-8")),
        )
        train_state: dict[str, Any] = dict(load_file(str(directory / "train_state.safetensors")))
        train_state.update(json.loads((directory / "train_state.json").read_text(encoding="utf-8")))
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"cannot read the training state in {directory}: {str(exc).splitlines()[0]}") from None
    return optimizer_state, train_state
