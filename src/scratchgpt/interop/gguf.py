"""GGUF export: a checkpoint as one file that llama.cpp, Ollama and LM Studio run, under llama.cpp's
GPT-2 architecture, with a Modelfile for Ollama beside it.

The weights map one to one, as for the Hugging Face export (hf.py): llama.cpp's GPT-2 tensors
hold nn.Linear's (out, in) layout, every layer has biases (zeros where ours has none), and the
head is written only when it is not tied to the token embedding.

The tokenizer must cut text exactly as ours does, in llama.cpp's GPT-2 tokenizer: byte-level
BPE, whose tokens are strings over a 256-character stand-in alphabet for the bytes
(`byte_level_alphabet`), applied after GPT-2's pre-tokenizing regex.
- BPE (ours is byte-level BPE with GPT-2's regex) maps over as it is.
- Bytes: the 256 one-byte tokens.
- Characters: each character's token is the stand-in string of its UTF-8 bytes, and for a
  character of several bytes the merges that join its bytes in order. No merge joins two
  characters (the first symbol of every merge starts a character), so llama.cpp's BPE gives one
  token per character, as ours does.

llama.cpp ends a completion at the end-of-text token, so that token must be one the model never
means as text: where the vocabulary has none, one is appended (id = our vocabulary size) with a
zero row in the embedding and the head. Its logit is then exactly 0: greedy decoding never picks
it while any real token scores above 0, and sampling picks it with probability 1 / (1 + sum of
exp(logits)).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..chat.template import JINJA, is_chat_tokenizer
from ..checkpoint import load_checkpoint
from ..config import ModelConfig
from ..errors import InteropError
from ..tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer, Tokenizer, byte_level_alphabet
from ..version import __version__
from .hf import check_exportable, refuse_to_cover

GGUF_DTYPES = ("f32", "f16", "q8_0")
END_OF_TEXT = "<|endoftext|>"
END_OF_TURN = "<|end|>"  # a chat model's end of a reply (chat/template.py)
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which every classic model uses
# gguf's token types (gguf.TokenType): a piece of text, or a control token that is never text.
NORMAL, CONTROL = 1, 3
# chat/template.py's JINJA, for Ollama: each message as <|role|>text<|end|>, then <|assistant|>.
OLLAMA_CHAT_TEMPLATE = ('TEMPLATE """{{- if .Messages }}{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>{{- end }}'
                        '{{- else }}<|user|>{{ .Prompt }}<|end|>{{- end }}<|assistant|>"""')
# A merge that never applies to UTF-8 text (byte 0xFF never occurs in it): llama.cpp reads a GPT-2
# tokenizer only with merges, and a vocabulary of one-byte tokens needs none.
NEVER_MERGES = "ÿ ÿ"


@dataclass
class GGUFVocab:
    """A tokenizer in llama.cpp's GPT-2 form: token strings by id, their types, merges, the end-of-text id."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    eos_id: int
    notes: list[str] = field(default_factory=list)


@dataclass
class GGUFResult:
    path: Path
    modelfile: Path
    dtype: str
    n_bytes: int
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# The tokenizer


def _stand_in(data: bytes) -> str:
    """The byte-level BPE string of some bytes: one stand-in character per byte."""
    alphabet = byte_level_alphabet()
    return "".join(alphabet[b] for b in data)


def _with_end_of_text(tokens: list[str], merges: list[str], notes: list[str], specials: tuple[str, ...] = (),
                      types: list[int] | None = None, eos_id: int | None = None) -> GGUFVocab:
    types = types or [NORMAL] * len(tokens)
    if specials:  # a chat model: its role tokens follow as control tokens, and a reply ends at <|end|>
        return GGUFVocab([*tokens, *specials], [*types, *[CONTROL] * len(specials)], merges or [NEVER_MERGES],
                         len(tokens) + specials.index(END_OF_TURN), notes)
    if eos_id is not None:
        return GGUFVocab(tokens, types, merges or [NEVER_MERGES], eos_id, notes)
    notes.append(f"appended {END_OF_TEXT} as token {len(tokens)}, with zero weights: llama.cpp needs an end-of-text "
                 "token that is not a real character; its logit is 0")
    return GGUFVocab([*tokens, END_OF_TEXT], [*types, CONTROL], merges or [NEVER_MERGES], len(tokens), notes)


def char_vocab(tokenizer: CharTokenizer) -> GGUFVocab:
    """One token per character: the stand-in string of its UTF-8 bytes, built by merges when it has several."""
    tokens, merges, seen = [], [], set()
    for char in tokenizer.chars:
        symbols = [_stand_in(bytes([b])) for b in char.encode("utf-8")]
        tokens.append("".join(symbols))
        for i in range(1, len(symbols)):  # join the bytes left to right: (b1 b2), (b1b2 b3), ...
            merge = f"{''.join(symbols[:i])} {symbols[i]}"
            if merge not in seen:
                seen.add(merge)
                merges.append(merge)
    return _with_end_of_text(tokens, merges, [], tokenizer.special_tokens)


def byte_vocab(tokenizer: ByteTokenizer) -> GGUFVocab:
    """The 256 one-byte tokens, in byte order."""
    return _with_end_of_text([_stand_in(bytes([b])) for b in range(256)], [], [], tokenizer.special_tokens)


def bpe_vocab(tokenizer: BPETokenizer) -> GGUFVocab:
    """Our byte-level BPE as it is; refused if it does not pre-tokenize as GPT-2 does."""
    description = json.loads(tokenizer.hf.to_str())
    pre = description.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space") or description.get("normalizer"):
        raise InteropError("cannot export this BPE tokenizer to GGUF: llama.cpp's GPT-2 tokenizer needs GPT-2's "
                           f"pre-tokenizer (ByteLevel with its regex, no prefix space, no normalizer), not {pre.get('type')!r}")
    vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    raw_merges = description["model"].get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw_merges]
    added = {t.content: i for i, t in tokenizer.hf.get_added_tokens_decoder().items()}
    if END_OF_TEXT in added:
        types = [CONTROL if token in added else NORMAL for token in tokens]
        return _with_end_of_text(tokens, merges, [], tokenizer.special_tokens, types, vocab[END_OF_TEXT])
    return _with_end_of_text(tokens, merges, [], tokenizer.special_tokens)


def gguf_vocab(tokenizer: Tokenizer) -> GGUFVocab:
    """The tokenizer in llama.cpp's GPT-2 form."""
    if isinstance(tokenizer, CharTokenizer):
        return char_vocab(tokenizer)
    if isinstance(tokenizer, ByteTokenizer):
        return byte_vocab(tokenizer)
    if isinstance(tokenizer, BPETokenizer):
        return bpe_vocab(tokenizer)
    raise InteropError(f"cannot export a {getattr(tokenizer, 'kind', type(tokenizer).__name__)!r} tokenizer to GGUF")


# ---------------------------------------------------------------------------------------------
# The weights


def gguf_tensors(model: torch.nn.Module, n_vocab: int) -> dict[str, np.ndarray]:
    """Our GPT's weights under llama.cpp's GPT-2 tensor names, float32, the vocabulary padded to `n_vocab` rows."""
    state = {name: t.detach().float().cpu() for name, t in model.state_dict().items()}
    config: ModelConfig = model.config

    def bias(name: str, size: int) -> torch.Tensor:
        return state.get(name, torch.zeros(size))

    def padded(weight: torch.Tensor) -> torch.Tensor:  # (V, C) -> (n_vocab, C), zero rows at the end
        return torch.cat([weight, weight.new_zeros(n_vocab - weight.size(0), weight.size(1))])

    C = config.n_embd
    out = {"token_embd.weight": padded(state["transformer.wte.weight"]),
           "position_embd.weight": state["transformer.wpe.weight"]}
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        pairs = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
                 "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
        for ours_name, theirs in ((f"blk.{i}.{k}", p + v) for k, v in pairs.items()):
            weight = state[theirs + ".weight"]
            out[ours_name + ".weight"] = weight
            out[ours_name + ".bias"] = bias(theirs + ".bias", weight.size(0))
    out["output_norm.weight"] = state["transformer.ln_f.weight"]
    out["output_norm.bias"] = bias("transformer.ln_f.bias", C)
    if not config.tie_weights:  # tied: llama.cpp reads the head from token_embd
        out["output.weight"] = padded(state["lm_head.weight"])
    return {name: t.contiguous().numpy() for name, t in out.items()}


def _stored(array: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    """The array as written for `dtype`, and its gguf type: matrices in f16 or q8_0, vectors always in f32."""
    import gguf

    if array.ndim == 1 or dtype == "f32":
        return array.astype(np.float32), gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    if dtype == "q8_0" and array.shape[-1] % block == 0:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), gguf.GGMLQuantizationType.F16  # q8_0 needs rows in blocks of 32: f16 instead


# ---------------------------------------------------------------------------------------------
# The file


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise InteropError("GGUF export needs the `gguf` package: pip install 'scratchgpt[gguf]'") from None
    return gguf


def write_gguf(model: torch.nn.Module, tokenizer: Tokenizer, path: Path, dtype: str = "f32", name: str = "scratchgpt") -> GGUFVocab:
    """Write `model` and `tokenizer` as a GGUF file at `path` (a new file, renamed into place when complete)."""
    gguf = _require_gguf()
    config: ModelConfig = model.config
    check_exportable(config, "GGUF (llama.cpp's GPT-2)")
    if dtype not in GGUF_DTYPES:
        raise InteropError(f"--dtype {dtype} is not a GGUF export type; use one of {', '.join(GGUF_DTYPES)}")
    vocab = gguf_vocab(tokenizer)
    tmp = Path(tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")[1])
    try:
        writer = gguf.GGUFWriter(str(tmp), "gpt2")
        writer.add_name(name)
        writer.add_description(f"exported by scratchgpt {__version__}")
        writer.add_context_length(config.block_size)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.mlp_width)
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(LAYER_NORM_EPS)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.types)
        writer.add_token_merges(vocab.merges)
        writer.add_bos_token_id(vocab.eos_id)
        writer.add_eos_token_id(vocab.eos_id)
        writer.add_add_bos_token(False)  # our models never saw a start token
        writer.add_add_eos_token(False)
        if is_chat_tokenizer(tokenizer):
            writer.add_chat_template(JINJA)  # llama.cpp's chat completion renders the messages as we do
        for tensor_name, array in gguf_tensors(model, len(vocab.tokens)).items():
            data, kind = _stored(array, dtype)
            writer.add_tensor(tensor_name, data, raw_dtype=kind)  # q8_0: bytes, whose shape gguf converts back
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return vocab


def modelfile_text(gguf_name: str, config: ModelConfig, chat: bool = False) -> str:
    """An Ollama Modelfile for the exported file: the prompt is continued as it is; for a chat model, the
    messages rendered by our chat template (in Ollama's Go template language), the reply ending at <|end|>.

    GPT-2 has a learned position for each place in its context and none beyond, and llama.cpp
    stops with an assertion past the last one, so new tokens are capped at half the context.
    """
    return "\n".join([
        f"# Ollama: ollama create NAME -f THIS_FILE, then ollama run NAME (exported by scratchgpt {__version__})",
        f"# The prompt and the new tokens must fit in the {config.block_size}-token context: GPT-2 has no position beyond it.",
        f"FROM ./{gguf_name}",
        OLLAMA_CHAT_TEMPLATE if chat else 'TEMPLATE """{{ .Prompt }}"""',
        *([f'PARAMETER stop "{END_OF_TURN}"'] if chat else []),
        f"PARAMETER num_ctx {config.block_size}",
        f"PARAMETER num_predict {max(1, config.block_size // 2)}",
        "PARAMETER temperature 0.8",
        "PARAMETER top_k 200",
        "PARAMETER repeat_penalty 1.0",
        "",
    ])


def export_gguf(checkpoint: str | Path, out: str | Path, dtype: str = "f32", overwrite: bool = False) -> GGUFResult:
    """Write `checkpoint` as `out` (a .gguf file) and an Ollama Modelfile beside it (`out` with .Modelfile)."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise InteropError(f"--out {out} should name a .gguf file, such as {out.with_suffix('.gguf')}")
    modelfile = out.with_suffix(".Modelfile")
    refuse_to_cover(out, Path(checkpoint))
    existing = [p for p in (out, modelfile) if p.exists()]
    if existing and not overwrite:
        raise InteropError(f"{existing[0]} already exists; choose another --out or pass --overwrite")
    if any(not p.is_file() for p in existing):  # --overwrite replaces the two files an export writes, nothing else
        raise InteropError(f"{next(p for p in existing if not p.is_file())} is not a file, so --overwrite leaves it alone")
    out.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer, config, _ = load_checkpoint(checkpoint)
    vocab = write_gguf(model, tokenizer, out, dtype, name=Path(str(checkpoint)).name)
    modelfile.write_text(modelfile_text(out.name, config.model, chat=is_chat_tokenizer(tokenizer)), encoding="utf-8")
    notes = [*vocab.notes, f"llama.cpp runs at most {config.model.block_size} tokens (prompt and new ones together): "
                           "GPT-2 has a learned position for each place in its context and none beyond it, and llama.cpp "
                           "stops with an assertion error past the last one (scratchgpt sample slides its window instead)"]
    if config.model.activation == "gelu":
        notes.append("llama.cpp computes GELU with the tanh approximation (looked up in a float16 table); this model "
                     "was trained with the exact GELU, so its logits there differ slightly (BENCHMARKS.md)")
    return GGUFResult(out, modelfile, dtype, out.stat().st_size, notes)
