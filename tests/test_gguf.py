"""GGUF export: the file's contents read back, the tokenizer mapping, and the same text in llama.cpp itself.

The llama.cpp tests need `llama-cpp-python` (the `llama` extra, which CI installs); elsewhere they
are skipped, except under CI, where a missing binding is an error.
"""

from __future__ import annotations

import dataclasses
import os
import shlex

import numpy as np
import pytest
import torch
from conftest import sharpen

from scratchgpt.build import build_model
from scratchgpt.checkpoint import save_checkpoint
from scratchgpt.cli import main
from scratchgpt.config import Config, ModelConfig, config_from_preset
from scratchgpt.errors import InteropError
from scratchgpt.interop.gguf import END_OF_TEXT, char_vocab, export_gguf, gguf_vocab, modelfile_text
from scratchgpt.sample import generate
from scratchgpt.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer, byte_level_alphabet

gguf = pytest.importorskip("gguf")

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
FOREIGN = "Grüße aus Köln — café, naïve, 東京 ✓\n"  # two-, three-byte characters and a dash


def llama_cpp():
    """The llama.cpp binding, or a skip (an error under CI, which installs it)."""
    if os.environ.get("CI"):
        import llama_cpp
        return llama_cpp
    return pytest.importorskip("llama_cpp")


def sharpened(config: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """A random model whose greedy choices are far from ties, so that kernel differences cannot flip them."""
    torch.manual_seed(seed)
    return sharpen(build_model(config).eval())


def checkpoint(tmp_path, model, tokenizer, name="ckpt"):
    return save_checkpoint(tmp_path / name, model, tokenizer, Config(model=model.config), {"step": 0})


def preset_model(name: str, vocab_size: int, **shrink) -> ModelConfig:
    return dataclasses.replace(config_from_preset(name).model, vocab_size=vocab_size, dropout=0.0, **shrink)


# ---------------------------------------------------------------------------------------------
# Without llama.cpp


def test_character_tokens_are_their_bytes_stand_ins_joined_by_merges():
    tok = CharTokenizer(sorted(set(TEXT + FOREIGN)))
    vocab = char_vocab(tok)
    alphabet = byte_level_alphabet()
    assert vocab.tokens[tok.encode(" ")[0]] == alphabet[0x20] == "Ġ" and vocab.tokens[tok.encode("\n")[0]] == "Ċ"
    ue = vocab.tokens[tok.encode("ü")[0]]
    assert ue == alphabet[0xC3] + alphabet[0xBC] and f"{alphabet[0xC3]} {alphabet[0xBC]}" in vocab.merges
    tokyo = "".join(alphabet[b] for b in "東".encode())
    assert vocab.tokens[tok.encode("東")[0]] == tokyo and f"{tokyo[:2]} {tokyo[2]}" in vocab.merges
    # every merge starts with a character's first byte, so no merge can join two characters
    leads = {alphabet[b] for b in range(0xC0, 0x100)}
    assert all(merge[0] in leads for merge in vocab.merges)
    assert vocab.tokens[-1] == END_OF_TEXT and vocab.eos_id == tok.vocab_size and vocab.types[-1] == 3


@pytest.mark.parametrize("text", [TEXT, FOREIGN])
def test_a_gpt2_bpe_built_from_the_mapping_cuts_text_as_our_char_tokenizer(text):
    """Hugging Face's byte-level BPE, given the exported tokens and merges, finds our ids (llama.cpp is tested below)."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = CharTokenizer(sorted(set(TEXT + FOREIGN)))
    vocab = char_vocab(tok)
    merges = [tuple(m.split(" ")) for m in vocab.merges]
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    for part in (p for merge in merges for p in merge if p not in ids):  # HF wants a merge's parts in its vocabulary;
        ids[part] = len(ids)  # llama.cpp does not. A text of known characters never ends on one of these.
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(ids, merges))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    assert bpe.encode(text).ids == tok.encode(text)


def test_the_file_holds_the_weights_and_the_gpt2_metadata(tmp_path):
    tok = CharTokenizer(sorted(set(TEXT)))
    model = sharpened(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32, tie_weights=False))
    result = export_gguf(checkpoint(tmp_path, model, tok), tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(result.path))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "gpt2" and field("gpt2.context_length") == 32
    assert (field("gpt2.embedding_length"), field("gpt2.block_count"), field("gpt2.attention.head_count")) == (32, 2, 2)
    assert field("gpt2.feed_forward_length") == 128 and field("tokenizer.ggml.eos_token_id") == tok.vocab_size
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    state = model.state_dict()
    wte = tensors["token_embd.weight"]
    assert wte.shape == (tok.vocab_size + 1, 32) and not wte[-1].any()  # the appended end-of-text row is zero
    assert np.array_equal(wte[:-1], state["transformer.wte.weight"].numpy())
    assert np.array_equal(tensors["blk.1.ffn_up.weight"], state["transformer.h.1.mlp.c_fc.weight"].numpy())
    assert not tensors["blk.0.attn_qkv.bias"].any()  # a model without biases exports zero biases
    assert np.array_equal(tensors["output.weight"][:-1], state["lm_head.weight"].numpy())
    assert result.modelfile.read_text().startswith("# Ollama")


def test_a_tied_head_is_left_to_the_token_embedding(tmp_path):
    tok = CharTokenizer(sorted(set(TEXT)))
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32))
    reader = gguf.GGUFReader(str(export_gguf(checkpoint(tmp_path, model, tok), tmp_path / "m.gguf").path))
    assert "output.weight" not in {t.name for t in reader.tensors}


MODELFILE_INSTRUCTIONS = {"FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE", "REQUIRES"}
OLLAMA_PARAMETERS = {"num_ctx", "num_predict", "temperature", "top_k", "top_p", "min_p", "repeat_penalty",
                     "repeat_last_n", "seed", "stop"}


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """Ollama's Modelfile grammar: `# comment`, or INSTRUCTION ARGUMENTS, where an argument may be a \"\"\"...\"\"\" block."""
    commands, lines = [], iter(text.splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        instruction, _, argument = line.partition(" ")
        assert instruction.upper() in MODELFILE_INSTRUCTIONS, f"not a Modelfile instruction: {line!r}"
        if argument.count('"""') == 1:  # a block that goes on over the next lines
            while '"""' not in (nxt := next(lines)):
                argument += "\n" + nxt
            argument += "\n" + nxt
        commands.append((instruction.upper(), argument))
    return commands


def test_the_modelfile_follows_ollamas_format_and_names_the_file():
    config = ModelConfig(vocab_size=65, block_size=64)
    commands = parse_modelfile(modelfile_text("baby.gguf", config))
    assert commands[0] == ("FROM", "./baby.gguf")
    assert ("TEMPLATE", '"""{{ .Prompt }}"""') in commands
    params = dict(shlex.split(arg) for kind, arg in commands if kind == "PARAMETER")
    assert set(params) <= OLLAMA_PARAMETERS and params["num_ctx"] == "64"
    with pytest.raises(AssertionError, match="not a Modelfile instruction"):
        parse_modelfile("FORM ./x.gguf\n")


@pytest.mark.parametrize("option,value", [("position", "rope"), ("norm", "rmsnorm"), ("qk_norm", True), ("activation", "relu2")])
def test_options_llama_cpps_gpt2_lacks_are_refused_by_name(tmp_path, option, value):
    tok = CharTokenizer(sorted(set(TEXT)))
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32, **{option: value}))
    with pytest.raises(InteropError, match=rf"GGUF .*{option}="):
        export_gguf(checkpoint(tmp_path, model, tok), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_the_command_writes_the_file_and_refuses_what_it_cannot(tmp_path, capsys):
    tok = CharTokenizer(sorted(set(TEXT)))
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32))
    ckpt = checkpoint(tmp_path, model, tok)
    assert main(["export", "--checkpoint", str(ckpt), "--format", "gguf", "--dtype", "q8_0", "--out", str(tmp_path / "m.gguf")]) == 0
    assert "m.Modelfile" in capsys.readouterr().out and (tmp_path / "m.Modelfile").is_file()
    assert main(["export", "--checkpoint", str(ckpt), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(ckpt), "--format", "gguf", "--out", str(tmp_path / "m.bin")]) == 1
    assert ".gguf" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(ckpt), "--dtype", "f16", "--out", str(tmp_path / "hf")]) == 1
    assert "--format gguf only" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# In llama.cpp


def load_in_llama(path, n_ctx):
    return llama_cpp().Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, seed=0)


def llama_greedy(llm, prompt_ids, n):
    """llama.cpp's greedy continuation of `prompt_ids`, by its own sampler at temperature 0."""
    out = []
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
        if token == llm.token_eos() or len(out) == n:
            break
        out.append(token)
    return out


def our_greedy(model, prompt_ids, n):
    return [int(ids[0]) for ids in generate(model, torch.tensor([prompt_ids]), n, temperature=0)]


def check_in_llama(tmp_path, model, tokenizer, text, n_new, dtype="f32", tolerance=None):
    """Export, load in llama.cpp: the same ids for `text`, the same greedy text, and (if given) logits within `tolerance`."""
    path = export_gguf(checkpoint(tmp_path, model, tokenizer, f"ckpt-{dtype}"), tmp_path / f"m-{dtype}.gguf", dtype=dtype).path
    llm = load_in_llama(path, model.config.block_size)
    ids = tokenizer.encode(text)
    assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ids
    if tolerance is not None:
        window = ids[: model.config.block_size]  # llama.cpp's context holds one window, as its position table does
        llm.reset()
        llm.eval(window)
        theirs = np.array(llm.scores[: len(window), : tokenizer.vocab_size])
        with torch.no_grad():
            ours = model(torch.tensor([window]))[0][0].numpy()
        assert np.abs(theirs - ours).max() < tolerance
    prompt = ids[-8:]
    expected = our_greedy(model, prompt, n_new)
    assert llama_greedy(llm, prompt, n_new) == expected
    assert llm.detokenize(expected).decode("utf-8", errors="replace") == tokenizer.decode(expected)
    return llm


def test_cpu_baby_in_llama_cpp_same_ids_logits_and_greedy_text(tmp_path):
    tok = CharTokenizer(sorted(set(TEXT + FOREIGN)))
    model = sharpened(preset_model("cpu-baby", tok.vocab_size))
    check_in_llama(tmp_path, model, tok, TEXT + FOREIGN, n_new=56, tolerance=0.05)  # 8 + 56 = the 64-token context


def test_shakespeare_char_in_llama_cpp_greedy_text_of_a_hundred_and_more_tokens(tmp_path):
    tok = CharTokenizer(sorted(set(TEXT + FOREIGN)))
    model = sharpened(preset_model("shakespeare-char", tok.vocab_size))
    check_in_llama(tmp_path, model, tok, TEXT + FOREIGN, n_new=150)


def test_llama_cpp_cuts_tiny_shakespeare_and_foreign_text_into_our_character_ids(tmp_path, shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")
    tok = CharTokenizer(sorted(set(text + FOREIGN)))
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32))
    path = export_gguf(checkpoint(tmp_path, model, tok), tmp_path / "m.gguf").path
    llm = llama_cpp().Llama(model_path=str(path), vocab_only=True, verbose=False)
    for piece in (text[:50_000], text[-50_000:], FOREIGN * 3 + text[:2000]):
        assert llm.tokenize(piece.encode("utf-8"), add_bos=False, special=False) == tok.encode(piece)


def test_byte_tokenizer_in_llama_cpp(tmp_path):
    tok = ByteTokenizer()
    model = sharpened(ModelConfig(vocab_size=256, block_size=160, n_layer=2, n_head=2, n_embd=64, tie_weights=False,
                                  activation="gelu_tanh", bias=True))
    check_in_llama(tmp_path, model, tok, TEXT + FOREIGN, n_new=120, tolerance=0.05)


def test_bpe_tokenizer_in_llama_cpp(tmp_path, shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")[:200_000]
    tok = BPETokenizer.train([text], vocab_size=400)
    model = sharpened(ModelConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=64, tie_weights=False))
    check_in_llama(tmp_path, model, tok, text[:600] + FOREIGN, n_new=110, tolerance=0.05)


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_smaller_files_keep_the_greedy_text_of_a_decisive_model(tmp_path, dtype):
    tok = CharTokenizer(sorted(set(TEXT + FOREIGN)))
    model = sharpened(preset_model("cpu-baby", tok.vocab_size))
    check_in_llama(tmp_path, model, tok, TEXT, n_new=40, dtype=dtype)


def test_a_trained_model_continues_the_same_in_llama_cpp(tmp_path, small_corpus):
    """A real (if small) training run, not a sharpened random model: its greedy text matches for 100 tokens."""
    from conftest import tiny_config

    from scratchgpt.checkpoint import load_checkpoint
    from scratchgpt.train import train

    config = tiny_config(small_corpus, max_steps=150, eval_interval=150)
    config.model.block_size = 128
    train(config, tmp_path / "run", progress=False)
    model, tok, _, _ = load_checkpoint(tmp_path / "run")
    text = small_corpus.read_text(encoding="utf-8")[:300]
    check_in_llama(tmp_path, model, tok, text, n_new=110, tolerance=0.05)


def test_export_of_an_imported_gpt2_bpe_keeps_its_end_of_text_token():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {ch: i for i, ch in enumerate(byte_level_alphabet().values())}
    vocab[END_OF_TEXT] = 256
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, []))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.add_special_tokens([END_OF_TEXT])
    mapped = gguf_vocab(BPETokenizer(hf))
    assert mapped.eos_id == 256 and len(mapped.tokens) == 257 and mapped.types[256] == 3 and mapped.merges
