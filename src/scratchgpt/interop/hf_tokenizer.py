"""Tokenizers in Hugging Face's formats: ours written as `tokenizer.json`, theirs read back as ours.

A character vocabulary travels as a BPE model with no merges; a BPE tokenizer already is one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..chat.template import CHAT_TOKENS, END, JINJA, is_chat_tokenizer
from ..checkpoint import load_checkpoint
from ..errors import InteropError, TokenizerError
from ..tokenizer import CharTokenizer, Tokenizer, tokenizer_from_dict, with_special_tokens

# Defined here, not in hf.py: hf.py imports this module, so this module cannot import hf.py.
END_OF_TEXT = "<|endoftext|>"  # GPT-2's document separator, its bos, eos and unk token


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise InteropError("this needs the `tokenizers` package: pip install 'scratchgpt[hf]'") from None
    return tokenizers


def char_tokenizer_to_hf(tokenizer: CharTokenizer):
    """A `tokenizers.Tokenizer` that maps each character to our id: BPE with no merges, fused on decode."""
    tokenizers = _require_tokenizers()
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={c: i for i, c in enumerate(tokenizer.chars)}, merges=[]))
    hf.decoder = tokenizers.decoders.Fuse()  # characters join with nothing between them
    return hf


def char_tokenizer_from_hf(hf_json: dict[str, Any]) -> CharTokenizer | None:
    """Our CharTokenizer if the HF tokenizer is one that `char_tokenizer_to_hf` writes, else None."""
    model = hf_json.get("model") or {}
    vocab = model.get("vocab")
    plain = (model.get("type") == "BPE" and not model.get("merges") and isinstance(vocab, dict)
             and not hf_json.get("normalizer") and not hf_json.get("pre_tokenizer") and not hf_json.get("added_tokens")
             and (hf_json.get("decoder") or {}).get("type") == "Fuse")
    if not plain or sorted(vocab.values()) != list(range(len(vocab))) or any(len(c) != 1 for c in vocab):
        return None
    return CharTokenizer(sorted(vocab, key=vocab.get))



def is_gpt2_style(hf_json: dict[str, Any]) -> bool:
    """True for GPT-2's own pipeline: byte-level BPE and nothing else, which GPT2TokenizerFast reproduces."""
    pre = hf_json.get("pre_tokenizer") or {}
    return ((hf_json.get("model") or {}).get("type") == "BPE" and pre.get("type") == "ByteLevel"
            and not hf_json.get("normalizer"))


def hf_tokenizer_config(hf_json: dict[str, Any], block_size: int) -> tuple[dict[str, Any], int | None]:
    """tokenizer_config.json for an HF tokenizer, and the id of its end-of-text token if it has one."""
    specials = {t["content"]: t["id"] for t in hf_json.get("added_tokens", []) if t.get("special")}
    end_id = specials.get(END_OF_TEXT)
    config: dict[str, Any] = {"model_max_length": block_size, "clean_up_tokenization_spaces": False}
    if is_gpt2_style(hf_json):
        # Special tokens the vocabulary lacks would be added by transformers, past the model's
        # vocabulary: name them only when they exist.
        token = END_OF_TEXT if end_id is not None else None
        config.update(tokenizer_class="GPT2TokenizerFast", add_prefix_space=False,
                      bos_token=token, eos_token=token, unk_token=token)
    else:
        config.update(tokenizer_class="PreTrainedTokenizerFast")
        if end_id is not None:
            config.update(bos_token=END_OF_TEXT, eos_token=END_OF_TEXT)
    return config, end_id


def write_hf_tokenizer(tokenizer: Tokenizer, out: Path, block_size: int) -> tuple[list[str], list[str], int | None]:
    """Write the tokenizer files transformers reads; returns (files, notes, end-of-text id)."""
    description = tokenizer.to_dict()
    kind = description["type"]
    notes = []
    if kind == "char":
        hf_json = json.loads(char_tokenizer_to_hf(tokenizer).to_str())
        notes.append(f"this model reads characters, not GPT-2's BPE tokens: its vocabulary is {tokenizer.vocab_size} "
                     "characters, written as tokenizer.json for AutoTokenizer (characters outside it are dropped "
                     "when encoding); GPT2Tokenizer and the gpt2 tokenizer do not fit it")
    elif kind == "bpe" and isinstance(description.get("hf_tokenizer"), dict):
        hf_json = description["hf_tokenizer"]
    else:
        raise InteropError(f"a {kind!r} tokenizer has no Hugging Face form here yet")
    if tokenizer.special_tokens:
        hf_json = _with_special_tokens(hf_json, tokenizer)
    (out / "tokenizer.json").write_text(json.dumps(hf_json, ensure_ascii=False), encoding="utf-8")
    config, end_id = hf_tokenizer_config(hf_json, block_size)
    if is_chat_tokenizer(tokenizer):  # apply_chat_template renders as chat/template.py does; a reply ends at <|end|>
        end_id = tokenizer.special_id(END)
        config.update(chat_template=JINJA, eos_token=END, pad_token=END)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return ["tokenizer.json", "tokenizer_config.json"], notes, end_id


def _with_special_tokens(hf_json: dict[str, Any], tokenizer: Tokenizer) -> dict[str, Any]:
    """The HF tokenizer with our special tokens added as its special tokens, at our ids."""
    tokenizers = _require_tokenizers()
    hf = tokenizers.Tokenizer.from_str(json.dumps(hf_json))
    hf.add_special_tokens(list(tokenizer.special_tokens))
    for name in tokenizer.special_tokens:
        if hf.token_to_id(name) != tokenizer.special_id(name):
            raise InteropError(f"the special token {name} would get id {hf.token_to_id(name)} in Hugging Face's "
                               f"tokenizer, not our {tokenizer.special_id(name)}")
    return json.loads(hf.to_str())


def _split_special_tokens(hf_json: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """An HF tokenizer's description without the chat template's tokens, and those tokens (in id order)."""
    added = hf_json.get("added_tokens") or []
    ours = sorted((t for t in added if t.get("content") in CHAT_TOKENS), key=lambda t: t["id"])
    return {**hf_json, "added_tokens": [t for t in added if t not in ours]}, [t["content"] for t in ours]


def gpt2_tokenizer_from_files(vocab_path: Path, merges_path: Path):
    """GPT-2's byte-level BPE as a `tokenizers.Tokenizer`, from the slow tokenizer's vocab.json and merges.txt."""
    tokenizers = _require_tokenizers()
    try:
        model = tokenizers.models.BPE.from_file(str(vocab_path), str(merges_path))
    except Exception as exc:  # tokenizers raises plain Exceptions for malformed files
        raise InteropError(f"cannot read the BPE vocabulary {vocab_path} / {merges_path}: {exc}") from None
    hf = tokenizers.Tokenizer(model)
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    hf.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
    if END_OF_TEXT in hf.get_vocab():  # kept whole, never split into bytes
        hf.add_special_tokens([END_OF_TEXT])
    return hf


def tokenizer_from_hf_json(hf_json: dict[str, Any], where: Path) -> Tokenizer:
    """Our tokenizer for an HF tokenizer.json: a character vocabulary comes back as one, others as BPE; the chat
    template's tokens (an export of a chat model) come back as our special tokens."""
    hf_json, specials = _split_special_tokens(hf_json)
    char = char_tokenizer_from_hf(hf_json)
    if char is not None:
        return with_special_tokens(char, specials) if specials else char
    try:
        bpe = tokenizer_from_dict({"type": "bpe", "hf_tokenizer": hf_json})
        return with_special_tokens(bpe, specials) if specials else bpe
    except TokenizerError as exc:
        raise InteropError(f"cannot import the tokenizer in {where}: {exc}; "
                           "pass --tokenizer FILE with a scratchgpt tokenizer.json instead") from None


def read_hf_tokenizer(directory: Path) -> Tokenizer | None:
    """Our tokenizer for the HF tokenizer files in `directory` (tokenizer.json, else vocab.json +
    merges.txt), or None when it holds none."""
    path = directory / "tokenizer.json"
    if path.is_file():
        try:
            hf_json = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InteropError(f"cannot read {path}: {exc}") from None
        return tokenizer_from_hf_json(hf_json, path)
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        hf = gpt2_tokenizer_from_files(directory / "vocab.json", directory / "merges.txt")
        return tokenizer_from_hf_json(json.loads(hf.to_str()), directory / "vocab.json")
    return None


def load_any_tokenizer(path: Path) -> Tokenizer:
    """A tokenizer from a scratchgpt tokenizer.json, a checkpoint or run directory, or an HF tokenizer directory or file."""
    if path.is_dir():
        if (path / "meta.json").is_file() or (path / "best").is_dir() or (path / "last").is_dir():
            return load_checkpoint(path)[1]
        tokenizer = read_hf_tokenizer(path)
        if tokenizer is None:
            raise InteropError(f"no tokenizer in {path}: pass a tokenizer.json file or a checkpoint directory")
        return tokenizer
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InteropError(f"cannot read tokenizer {path}: {exc}") from None
    if isinstance(data, dict) and "model" in data and "type" not in data:  # an HF tokenizers file
        return tokenizer_from_hf_json(data, path)
    try:
        return tokenizer_from_dict(data)
    except TokenizerError as exc:
        raise InteropError(f"{path}: {exc}") from None

