"""Hugging Face GPT-2 interop: the same logits on both sides, round trips, and refusals."""

from __future__ import annotations

import json

import pytest
import torch

from scratchgpt.checkpoint import load_checkpoint, save_checkpoint
from scratchgpt.cli import main
from scratchgpt.config import Config, DataConfig, ModelConfig, TrainConfig
from scratchgpt.errors import InteropError
from scratchgpt.interop.hf import export_hf, import_hf
from scratchgpt.model import GPT
from scratchgpt.tokenizer import CharTokenizer, save_tokenizer

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4  # max abs logit difference allowed between the two implementations, float32


@pytest.fixture(scope="module")
def tokenizer(small_corpus) -> CharTokenizer:
    return CharTokenizer.from_text(small_corpus.read_text(encoding="utf-8"))


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Large random weights, biases and norm gains, so a misplaced or mis-transposed tensor shows in the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def _checkpoint(tmp_path, tokenizer, name="ckpt", **model_options):
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32, **model_options)
    torch.manual_seed(0)
    model = GPT(config)
    _randomize(model)
    model.eval()
    path = save_checkpoint(tmp_path / name, model, tokenizer, Config(model=config), {"step": 5})
    return path, model


def _inputs(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))


def _hf_logits(directory, idx: torch.Tensor, **config_overrides) -> torch.Tensor:
    model = transformers.GPT2LMHeadModel.from_pretrained(directory, **config_overrides).eval()
    with torch.no_grad():
        return model(idx).logits


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_gelu_tanh_is_gpt2s_formula():
    """The MLP's gelu_tanh option is GPT-2's tanh approximation, written out here by hand."""
    import math

    from scratchgpt.model import MLP

    mlp = MLP(ModelConfig(n_embd=4, n_head=1, mlp_hidden=8, activation="gelu_tanh", bias=True))
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)) * 3
    h = mlp.c_fc(x)
    by_hand = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    assert torch.allclose(mlp(x), mlp.c_proj(by_hand), atol=1e-6)
    exact = MLP(ModelConfig(n_embd=4, n_head=1, mlp_hidden=8, activation="gelu", bias=True))
    exact.load_state_dict(mlp.state_dict())
    assert not torch.allclose(exact(x), mlp(x), atol=1e-6)


CLASSIC = [
    dict(),  # the package default: no biases, tied head, exact GELU
    dict(bias=True, tie_weights=False, mlp_hidden=48, activation="gelu_tanh"),
]


@pytest.mark.parametrize("options", CLASSIC, ids=["default", "bias-untied-gelu_tanh"])
def test_export_gives_the_same_logits_in_transformers(tmp_path, tokenizer, options):
    ckpt, model = _checkpoint(tmp_path, tokenizer, **options)
    export_hf(ckpt, tmp_path / "hf")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["tie_word_embeddings"] == model.config.tie_weights
    assert hf_config["n_inner"] == (options.get("mlp_hidden") or None)
    idx = _inputs(tokenizer.vocab_size)
    with torch.no_grad():
        ours = model(idx)[0]
    assert ours.abs().max() > 1.0  # large enough logits that a wrong tensor could not hide
    assert _max_diff(_hf_logits(tmp_path / "hf", idx), ours) < TOLERANCE


def test_the_gelu_flavour_is_visible_in_the_logits(tmp_path, tokenizer):
    """The tanh/erf choice matters at this tolerance, so the activation mapping is really tested."""
    ckpt, model = _checkpoint(tmp_path, tokenizer, activation="gelu_tanh")
    export_hf(ckpt, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["activation_function"] == "gelu_new"
    idx = _inputs(tokenizer.vocab_size)
    with torch.no_grad():
        ours = model(idx)[0]
    assert _max_diff(_hf_logits(tmp_path / "hf", idx), ours) < TOLERANCE
    assert _max_diff(_hf_logits(tmp_path / "hf", idx, activation_function="gelu"), ours) > 2 * TOLERANCE


def test_exported_char_tokenizer_encodes_like_ours(tmp_path, tokenizer, small_corpus):
    ckpt, _ = _checkpoint(tmp_path, tokenizer)
    result = export_hf(ckpt, tmp_path / "hf")
    assert "characters" in result.notes[0]
    assert "reads characters" in (tmp_path / "hf" / "README.md").read_text()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = small_corpus.read_text(encoding="utf-8")[:300]
    ids = hf_tokenizer(text)["input_ids"]
    assert ids == tokenizer.encode(text)
    assert hf_tokenizer.decode(ids) == text


def _random_gpt2(vocab_size: int, tie: bool = True):
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=vocab_size, n_positions=16,
                                     tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    _randomize(model, seed=3)
    return model.eval()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_import_a_transformers_gpt2_gives_the_same_logits(tmp_path, tokenizer, tie):
    hf_model = _random_gpt2(tokenizer.vocab_size, tie)
    hf_model.save_pretrained(tmp_path / "gpt2", max_shard_size="20KB")  # several safetensors shards + an index
    assert (tmp_path / "gpt2" / "model.safetensors.index.json").is_file()
    save_tokenizer(tokenizer, tmp_path / "vocab.json")
    import_hf(tmp_path / "gpt2", tmp_path / "ours", tokenizer_path=tmp_path / "vocab.json")
    model, loaded_tokenizer, config, meta = load_checkpoint(tmp_path / "ours")
    assert loaded_tokenizer == tokenizer and meta["step"] == 0
    assert config.model.activation == "gelu_tanh" and config.model.bias and config.model.tie_weights == tie
    idx = _inputs(tokenizer.vocab_size)
    with torch.no_grad():
        expected = hf_model(idx).logits
        assert _max_diff(model(idx)[0], expected) < TOLERANCE


def test_import_an_old_style_pytorch_model_bin(tmp_path, tokenizer):
    """The original GPT-2 files: no `transformer.` prefix, causal-mask buffers, a pickle read with weights_only."""
    hf_model = _random_gpt2(tokenizer.vocab_size)
    state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    for layer in range(2):
        state[f"h.{layer}.attn.bias"] = torch.ones(1, 1, 16, 16).tril()
        state[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    (tmp_path / "gpt2").mkdir()
    torch.save(state, tmp_path / "gpt2" / "pytorch_model.bin")
    hf_model.config.to_json_file(tmp_path / "gpt2" / "config.json")
    save_tokenizer(tokenizer, tmp_path / "vocab.json")
    import_hf(tmp_path / "gpt2", tmp_path / "ours", tokenizer_path=tmp_path / "vocab.json")
    model = load_checkpoint(tmp_path / "ours")[0]
    idx = _inputs(tokenizer.vocab_size)
    with torch.no_grad():
        assert _max_diff(model(idx)[0], hf_model(idx).logits) < TOLERANCE


def test_export_import_export_round_trips(tmp_path, tokenizer):
    from safetensors.torch import load_file

    ckpt, model = _checkpoint(tmp_path, tokenizer, tie_weights=False)
    export_hf(ckpt, tmp_path / "hf1")
    import_hf(tmp_path / "hf1", tmp_path / "back")  # the tokenizer comes back from the exported tokenizer.json
    back, back_tokenizer, _, _ = load_checkpoint(tmp_path / "back")
    assert back_tokenizer == tokenizer
    idx = _inputs(tokenizer.vocab_size)
    with torch.no_grad():
        assert torch.equal(back(idx)[0], model(idx)[0])
    export_hf(tmp_path / "back", tmp_path / "hf2")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf1" / name).read_text() == (tmp_path / "hf2" / name).read_text()
    first, second = load_file(tmp_path / "hf1" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("options,option", [
    (dict(norm="rmsnorm"), "norm"),
    (dict(position="rope"), "position"),
    (dict(qk_norm=True), "qk_norm"),
    (dict(activation="swiglu"), "activation"),
    (dict(model_type="bigram"), "model_type"),
])
def test_export_refuses_what_gpt2_cannot_express(tmp_path, tokenizer, options, option, capsys):
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16, **options)
    from scratchgpt.build import build_model

    save_checkpoint(tmp_path / "ckpt", build_model(config), tokenizer, Config(model=config), {"step": 0})
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert option in err and err.count("\n") == 1
    assert not (tmp_path / "hf" / "model.safetensors").exists()


@pytest.mark.parametrize("change,option", [
    ({"activation_function": "relu"}, "activation_function"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
    ({"model_type": "llama"}, "model_type"),
    ({"vocab_size": 7}, "vocab_size"),
])
def test_import_refuses_what_our_model_cannot_express(tmp_path, tokenizer, change, option):
    ckpt, _ = _checkpoint(tmp_path, tokenizer)
    export_hf(ckpt, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(InteropError, match=option):
        import_hf(tmp_path / "hf", tmp_path / "back")


def test_import_refuses_a_directory_without_weights_or_tokenizer(tmp_path, tokenizer):
    ckpt, _ = _checkpoint(tmp_path, tokenizer)
    export_hf(ckpt, tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").unlink()
    with pytest.raises(InteropError, match="--tokenizer"):
        import_hf(tmp_path / "hf", tmp_path / "back")
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(InteropError, match="no model.safetensors"):
        import_hf(tmp_path / "hf", tmp_path / "back", tokenizer_path=ckpt)


def test_cli_export_import_then_sample_eval_and_fine_tune(tmp_path, tokenizer, small_corpus, capsys):
    ckpt, model = _checkpoint(tmp_path, tokenizer)
    hf_dir, back = tmp_path / "hf", tmp_path / "back"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "hf", "--out", str(hf_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("note: this model reads characters") and "from_pretrained" in out
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(hf_dir)]) == 1  # not over an earlier export
    assert "--overwrite" in capsys.readouterr().err
    assert main(["import", "--format", "hf", "--from", str(hf_dir), "--out", str(back)]) == 0
    assert "--init-from" in capsys.readouterr().out

    assert main(["sample", "--checkpoint", str(back), "--prompt", "the ", "--max-new-tokens", "8", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("the ")
    assert main(["eval", "--checkpoint", str(back), "--data", str(small_corpus), "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["val_loss"] > 0

    # Fine-tuning at a learning rate of 0 must leave the imported weights exactly as they were.
    run = tmp_path / "tuned"
    assert main(["train", "--init-from", str(back), "--data", str(small_corpus), "--out", str(run), "--max-steps", "2",
                 "--lr", "0", "--min-lr", "0", "--eval-interval", "2", "--eval-iters", "1", "--batch-size", "2",
                 "--sample-tokens", "0", "--device", "cpu", "--dtype", "float32", "--dropout", "0.1", "--no-progress"]) == 0
    capsys.readouterr()
    tuned, _, tuned_config, _ = load_checkpoint(run / "last")
    assert tuned_config.model.n_embd == 32 and tuned_config.model.bias and tuned_config.model.dropout == 0.1
    reference = load_checkpoint(back)[0].state_dict()
    assert all(torch.equal(tensor, reference[name]) for name, tensor in tuned.state_dict().items())

    assert main(["train", "--init-from", str(back), "--n-layer", "3", "--data", str(small_corpus), "--out", str(tmp_path / "x")]) == 1
    assert "--n-layer cannot be combined with --init-from" in capsys.readouterr().err


def test_init_from_through_the_python_api(tmp_path, tokenizer, small_corpus):
    """A preset's own model section is replaced by the checkpoint's, and training moves the weights."""
    from conftest import tiny_config

    import scratchgpt

    ckpt, model = _checkpoint(tmp_path, tokenizer, bias=True)
    config = tiny_config(small_corpus, max_steps=3, eval_interval=3, init_from=str(ckpt))
    config.model = ModelConfig(n_layer=1, n_head=1, n_embd=8)  # ignored: the checkpoint fixes the shape
    scratchgpt.train(config, tmp_path / "run", progress=False, log=lambda msg: None)
    tuned, _, saved_config, _ = load_checkpoint(tmp_path / "run" / "last")
    assert saved_config.model.n_embd == 32 and saved_config.train.init_from == str(ckpt)
    moved = (tuned.transformer.wte.weight - model.transformer.wte.weight).abs().max()
    assert 0 < moved < 0.1  # started from the checkpoint, then trained a little
    assert isinstance(saved_config.data, DataConfig) and isinstance(saved_config.train, TrainConfig)


# ---------------------------------------------------------------------------------------------
# Byte-level BPE tokenizers (GPT-2's kind)


def _train_gpt2_style_bpe(text: str, vocab_size: int = 300):
    """A small byte-level BPE with GPT-2's pipeline and its <|endoftext|> token, trained here, offline."""
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([text], trainer)
    return hf


SAMPLE = "The cat sat.\n  Then   the dög ran! <|endoftext|>A fox's hat?"


def test_gpt2_vocab_and_merges_read_like_transformers(tmp_path, small_corpus):
    from scratchgpt.interop.hf_tokenizer import gpt2_tokenizer_from_files

    hf = _train_gpt2_style_bpe(small_corpus.read_text(encoding="utf-8"))
    hf.model.save(str(tmp_path))  # GPT-2's slow-tokenizer files: vocab.json and merges.txt
    ours = gpt2_tokenizer_from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    reference = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    ids = ours.encode(SAMPLE).ids
    assert ids == reference(SAMPLE)["input_ids"] and ids.count(ours.token_to_id("<|endoftext|>")) == 1
    assert ours.decode(ids, skip_special_tokens=False) == SAMPLE


def _bpe_tokenizer(hf):
    """Our BPE tokenizer around `hf` (a failure to load it is a failure of the test)."""
    from scratchgpt.tokenizer import tokenizer_from_dict

    return tokenizer_from_dict({"type": "bpe", "hf_tokenizer": json.loads(hf.to_str())})


def test_bpe_export_loads_in_transformers_and_imports_back(tmp_path, small_corpus):
    tokenizer = _bpe_tokenizer(_train_gpt2_style_bpe(small_corpus.read_text(encoding="utf-8")))
    ckpt, model = _checkpoint(tmp_path, tokenizer, activation="gelu_tanh")
    result = export_hf(ckpt, tmp_path / "hf")
    assert result.notes == []
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["eos_token_id"] == tokenizer.encode("<|endoftext|>")[0]
    for cls in (transformers.AutoTokenizer, transformers.GPT2TokenizerFast):
        loaded = cls.from_pretrained(tmp_path / "hf")
        assert len(loaded) == tokenizer.vocab_size
        assert loaded(SAMPLE)["input_ids"] == tokenizer.encode(SAMPLE)
        assert loaded.decode(tokenizer.encode(SAMPLE)) == SAMPLE
    idx = _inputs(tokenizer.vocab_size)
    with torch.no_grad():
        assert _max_diff(_hf_logits(tmp_path / "hf", idx), model(idx)[0]) < TOLERANCE
    import_hf(tmp_path / "hf", tmp_path / "back")
    back, back_tokenizer, config, _ = load_checkpoint(tmp_path / "back")
    assert back_tokenizer.encode(SAMPLE) == tokenizer.encode(SAMPLE) and config.data.tokenizer == "bpe"
    with torch.no_grad():
        assert torch.equal(back(idx)[0], model(idx)[0])


def test_import_a_gpt2_directory_with_vocab_and_merges(tmp_path, small_corpus):
    """Like the original GPT-2 download: weights, config.json, vocab.json and merges.txt."""
    hf_tokenizer = _train_gpt2_style_bpe(small_corpus.read_text(encoding="utf-8"))
    _bpe_tokenizer(hf_tokenizer)
    hf_model = _random_gpt2(hf_tokenizer.get_vocab_size())
    hf_model.save_pretrained(tmp_path / "gpt2")
    hf_tokenizer.model.save(str(tmp_path / "gpt2"))
    import_hf(tmp_path / "gpt2", tmp_path / "ours")
    model, tokenizer, _, _ = load_checkpoint(tmp_path / "ours")
    reference = transformers.GPT2TokenizerFast.from_pretrained(tmp_path / "gpt2")
    assert tokenizer.encode(SAMPLE) == reference(SAMPLE)["input_ids"]
    idx = torch.tensor([tokenizer.encode(SAMPLE)[:16]])
    with torch.no_grad():
        assert _max_diff(model(idx)[0], hf_model(idx).logits) < TOLERANCE


def test_overwrite_replaces_only_an_earlier_export_never_the_source_or_other_files(tmp_path, tokenizer):
    ckpt, _ = _checkpoint(tmp_path, tokenizer)
    hf_dir = tmp_path / "hf"
    export_hf(ckpt, hf_dir)
    export_hf(ckpt, hf_dir, overwrite=True)  # an earlier export of ours: replaced
    assert (hf_dir / "model.safetensors").is_file()
    for out in (ckpt, tmp_path, ckpt / "inner"):  # the checkpoint itself, a folder holding it, a folder inside it
        with pytest.raises(InteropError, match="would overwrite the model being converted"):
            export_hf(ckpt, out, overwrite=True)
    assert (ckpt / "model.safetensors").is_file()
    mine = tmp_path / "my-notes"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    with pytest.raises(InteropError, match="not written by scratchgpt export"):
        export_hf(ckpt, mine, overwrite=True)
    assert (mine / "thesis.txt").read_text() == "years of work"
    with pytest.raises(InteropError, match="not a scratchgpt checkpoint"):
        import_hf(hf_dir, mine, tokenizer_path=ckpt, overwrite=True)
    with pytest.raises(InteropError, match="would overwrite the model being converted"):
        import_hf(hf_dir, hf_dir, tokenizer_path=ckpt, overwrite=True)
    assert (mine / "thesis.txt").is_file() and (hf_dir / "config.json").is_file()


def test_a_weight_index_cannot_reach_outside_the_imported_directory(tmp_path, tokenizer):
    import json

    ckpt, _ = _checkpoint(tmp_path, tokenizer)
    hf_dir = tmp_path / "hf"
    export_hf(ckpt, hf_dir)
    secret = tmp_path / "elsewhere.safetensors"
    (hf_dir / "model.safetensors").rename(secret)
    for name in ("../elsewhere.safetensors", str(secret)):
        index = {"weight_map": {"transformer.wte.weight": name}}
        (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
        with pytest.raises(InteropError, match="not a file in"):
            import_hf(hf_dir, tmp_path / "back", tokenizer_path=ckpt)
