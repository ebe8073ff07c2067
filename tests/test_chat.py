"""Chat: the template and its loss mask, role tokens, conversations as data, sft on the training loop, LoRA,
`scratchgpt chat`, and /v1/chat/completions through the openai client."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config

from scratchgpt.build import build_model
from scratchgpt.chat.data import IGNORE, batch_tensors
from scratchgpt.chat.sft import sft, sft_config
from scratchgpt.chat.tasks import builtin_conversations, dialogue, is_correct, task_examples
from scratchgpt.chat.template import (
    CHAT_TOKENS,
    JINJA,
    Message,
    as_messages,
    chat_tokenizer,
    render,
)
from scratchgpt.checkpoint import load_checkpoint
from scratchgpt.config import ModelConfig
from scratchgpt.errors import CheckpointError, DataError, ScratchGPTError
from scratchgpt.lora import LoRALinear, adapter_state, add_lora, count_trainable, merge
from scratchgpt.tokenizer import ByteTokenizer, CharTokenizer, tokenizer_from_dict

CHARS = CharTokenizer(list(" .abcdefghijklmnopqrstuvwxyz\n"))


def _conversations(n: int = 40) -> list[dict]:
    words = ["cat", "dog", "bird", "fox", "mat", "log", "hat"]
    return [{"messages": [{"role": "user", "content": f"the {w}"}, {"role": "assistant", "content": w[::-1]}]}
            for w in (words * n)[:n]]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, small_corpus):
    from scratchgpt.train import train

    out = tmp_path_factory.mktemp("base") / "run"
    config = tiny_config(small_corpus, max_steps=20, eval_interval=20)
    config.model.block_size = 32
    train(config, out, progress=False, log=lambda line: None)
    return out


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in _conversations()), encoding="utf-8")
    return path


def _sft_config(base_run, chats, **train):
    settings = dict(max_steps=12, eval_interval=6, eval_iters=1, batch_size=4, sample_tokens=0, device="cpu",
                    dtype="float32", lr_decay_steps=12, warmup_steps=2)
    return sft_config(str(base_run), {"train": {**settings, **train}, "data": {"path": str(chats)}})


# --- the template and the loss mask -----------------------------------------------------------------------------

def test_the_mask_of_a_two_turn_conversation_computed_by_hand():
    tok = chat_tokenizer(CHARS)
    system, user, assistant, end = (tok.special_id(t) for t in CHAT_TOKENS)
    a, b, c = (CHARS.encode(ch)[0] for ch in "abc")
    messages = [Message("user", "ab"), Message("assistant", "c"), Message("user", "b"), Message("assistant", "ca")]
    r = render(messages, tok)
    assert r.ids == [user, a, b, end, assistant, c, end, user, b, end, assistant, c, a, end]
    assert r.mask == [False, False, False, False, False, True, True, False, False, False, False, True, True, True]
    x, y = batch_tensors([r])
    assert x.tolist() == [r.ids[:-1]]
    # the targets: the assistant's text and its <|end|>, IGNORE everywhere else
    I = IGNORE  # noqa: E741
    assert y.tolist() == [[I, I, I, I, c, end, I, I, I, I, c, a, end]]
    assert render(messages[:1], tok, add_generation_prompt=True).ids == [user, a, b, end, assistant]
    assert system == tok.base_vocab_size and end == tok.base_vocab_size + 3


def test_a_batch_pads_shorter_conversations_with_ignored_targets():
    tok = chat_tokenizer(CHARS)
    short = render([Message("user", "a"), Message("assistant", "b")], tok)
    long = render([Message("user", "abc"), Message("assistant", "bc")], tok)
    x, y = batch_tensors([short, long])
    assert x.shape == y.shape == (2, len(long.ids) - 1)
    assert (y[0, len(short.ids) - 1:] == IGNORE).all()
    assert (y != IGNORE).sum().item() == 2 + 3  # "b" + end, "bc" + end


def test_tokens_outside_the_assistants_spans_never_change_the_loss_or_the_gradients():
    tok = chat_tokenizer(CHARS)
    torch.manual_seed(0)
    model = build_model(ModelConfig(block_size=32, n_layer=1, n_head=2, n_embd=16, vocab_size=tok.vocab_size))

    def loss_and_grads(last_user_turn: str):
        r = render([Message("system", "be brief"), Message("user", "the cat"), Message("assistant", "tac"),
                    Message("user", last_user_turn)], tok)
        model.zero_grad()
        _, loss = model(*batch_tensors([r]))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    # The last user turn comes after every assistant token: it is neither a target nor in any target's context.
    loss_a, grads_a = loss_and_grads("xyz")
    loss_b, grads_b = loss_and_grads("qqq")
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(ga, gb) for ga, gb in zip(grads_a, grads_b, strict=True))
    # ... while a change inside the assistant's reply does change the loss
    r = render([Message("user", "the cat"), Message("assistant", "dog")], tok)
    _, other = model(*batch_tensors([r]))
    assert not torch.equal(other.detach(), loss_a)


def test_the_masked_loss_is_the_mean_over_the_assistants_tokens_only():
    tok = chat_tokenizer(CHARS)
    torch.manual_seed(1)
    model = build_model(ModelConfig(block_size=32, n_layer=1, n_head=2, n_embd=16, vocab_size=tok.vocab_size))
    r = render([Message("user", "ab"), Message("assistant", "cab")], tok)
    x, y = batch_tensors([r])
    logits, loss = model(x, y)
    picked = [-torch.log_softmax(logits[0, t], -1)[y[0, t]] for t in range(y.size(1)) if y[0, t] != IGNORE]
    assert len(picked) == 4  # c, a, b, <|end|>
    assert torch.allclose(loss, torch.stack(picked).mean())


# --- role tokens ----------------------------------------------------------------------------------------------------

def test_no_text_encodes_to_a_role_token():
    from scratchgpt.tokenizer import BPETokenizer

    bpe = BPETokenizer.train(["<|user|> hello <|end|> " * 50, "<|assistant|><|system|>"], vocab_size=300)
    for base in (ByteTokenizer(), bpe, CharTokenizer(list("<|>abcdefghijklmnopqrstuvwxyz"))):
        tok = chat_tokenizer(base)
        text = "".join(CHAT_TOKENS) + "<|user|>hi"
        ids = tok.encode(text)
        assert ids and max(ids) < tok.base_vocab_size, base
        assert tok.decode(ids) == text  # the characters survive as characters
        assert tok.decode([tok.special_id("<|user|>")]) == "<|user|>"  # the token itself is written as its name
        again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
        assert again == tok and again.vocab_size == base.vocab_size + 4
        assert again != base


def test_a_message_with_an_unknown_role_or_no_text_is_refused():
    with pytest.raises(ScratchGPTError, match=r"messages\[0\].role is 'robot'"):
        as_messages([{"role": "robot", "content": "hi"}])
    with pytest.raises(ScratchGPTError, match="non-empty list"):
        as_messages([])
    with pytest.raises(ScratchGPTError, match=r"messages\[1\].content must be a string"):
        as_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}])


# --- conversations as data -------------------------------------------------------------------------------------------

def test_a_bad_jsonl_line_is_refused_with_its_file_and_line(tmp_path):
    from scratchgpt.chat.conversations import read_conversations

    path = tmp_path / "c.jsonl"
    good = json.dumps(_conversations(1)[0])
    path.write_text(f"{good}\n\n{good}\n{{\"messages\": [{{\"role\": \"user\", \"content\": \"x\"}}]}}\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:4: the conversation has no assistant message"):
        read_conversations(str(path))
    path.write_text(f"{good}\nnot json\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:2: not JSON"):
        read_conversations(str(path))
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "a.jsonl").write_text(good + "\n" + good + "\n", encoding="utf-8")
    (tmp_path / "more" / "notes.txt").write_text("not conversations", encoding="utf-8")
    assert len(read_conversations(str(tmp_path / "more"))) == 2  # a folder: its .jsonl files only


def test_the_built_in_tasks_hold_out_words_never_trained_on():
    text = "the quick brown fox jumps over the lazy dog and then the horse ran off to the castle\n" * 3
    train = {e.prompt for e in task_examples(text, held_out=False)}
    held = task_examples(text, held_out=True)
    assert held and not train & {e.prompt for e in held}
    reverse = [e for e in task_examples(text, held_out=False) if e.task == "backwards"]
    assert all(e.answer == e.prompt.split()[1][::-1] for e in reverse)
    assert is_correct(" esroh.", "esroh") and not is_correct("esro", "esroh")


def test_dialogue_pairs_consecutive_speeches_of_different_speakers():
    text = "ROMEO:\nGood night.\n\nJULIET:\nSweet sorrow.\n\nJULIET:\nAgain.\n\nNURSE:\nMadam!\n"
    pairs = dialogue(text)
    assert [(p[0].content, p[1].content) for p in pairs] == [("Good night.", "Sweet sorrow."), ("Again.", "Madam!")]
    train, val, held = builtin_conversations(text * 4, n_train_chars=len(text) * 3)
    assert train and val


# --- LoRA -----------------------------------------------------------------------------------------------------------

def _tiny_gpt(vocab: int = 29, tie: bool = False):
    torch.manual_seed(3)
    return build_model(ModelConfig(block_size=16, n_layer=2, n_head=2, n_embd=16, vocab_size=vocab, tie_weights=tie))


@pytest.mark.parametrize("tie", [False, True])
def test_lora_at_step_0_is_the_base_model_exactly(tie):
    model = _tiny_gpt(tie=tie)
    x = torch.randint(29, (2, 10))
    before, _ = model(x)
    add_lora(model, rank=4, alpha=8, vocab_size=33)
    after, _ = model(x)
    assert torch.equal(after[..., :29], before)  # the old tokens' logits, bit for bit
    assert after.shape[-1] == 33
    n_lora = sum(m.lora_a.numel() + m.lora_b.numel() for m in model.modules() if isinstance(m, LoRALinear))
    assert count_trainable(model) == n_lora + (4 if tie else 8) * 16  # A, B and the new tokens' rows
    assert {n.split(".")[-1] for n in adapter_state(model)} == {"lora_a", "lora_b", "rows"}


@pytest.mark.parametrize("tie", [False, True])
def test_merged_lora_equals_the_unmerged_model(tie):
    model = add_lora(_tiny_gpt(tie=tie), rank=4, alpha=8, vocab_size=31)
    with torch.no_grad():
        for p in adapter_state(model):
            model.get_parameter(p).normal_(0, 0.5)
    x = torch.randint(31, (2, 12))
    unmerged, _ = model(x)
    merged = merge(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert merged.lm_head.weight.shape[0] == 31 and (merged.lm_head.weight is merged.transformer.wte.weight) == tie
    logits, _ = merged(x)
    assert torch.allclose(logits, unmerged, atol=1e-5)


def test_an_unknown_lora_target_is_refused():
    with pytest.raises(ScratchGPTError, match="names no linear layer"):
        add_lora(_tiny_gpt(), rank=2, alpha=2, targets=("q_proj",))


# --- sft --------------------------------------------------------------------------------------------------------------

def test_sft_fine_tunes_a_copy_and_never_touches_the_base(tmp_path, base_run, chats):
    before = {p.name: p.read_bytes() for p in (base_run / "best").iterdir()}
    result = sft(_sft_config(base_run, chats), tmp_path / "chat", progress=False, log=lambda line: None)
    assert result.train.steps == 12 and result.exact_match == {}  # user data: no built-in tasks to score
    assert {p.name: p.read_bytes() for p in (base_run / "best").iterdir()} == before
    model, tok, config, _ = load_checkpoint(tmp_path / "chat" / "last")
    assert config.data.chat and tok.special_tokens == CHAT_TOKENS and model.config.vocab_size == tok.vocab_size
    rows = [json.loads(line) for line in (tmp_path / "chat" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "eval" for r in rows) and (tmp_path / "chat" / "loss.png").is_file()


def test_a_lora_checkpoint_holds_its_adapter_and_names_its_base(tmp_path, base_run, chats):
    out = tmp_path / "lora"
    sft(_sft_config(base_run, chats, lora_rank=2, lora_alpha=4), out, progress=False, log=lambda line: None)
    meta = json.loads((out / "last" / "meta.json").read_text())
    assert meta["lora"]["base"] == str((base_run / "best").resolve())
    from safetensors.torch import load_file

    stored = load_file(str(out / "last" / "model.safetensors"))
    assert stored and all(k.endswith(("lora_a", "lora_b", "rows")) for k in stored)
    merged, _, _, _ = load_checkpoint(out / "last")
    unmerged, _, _, _ = load_checkpoint(out / "last", merge_lora=False)
    x = torch.randint(merged.config.vocab_size, (2, 9))
    assert torch.allclose(merged(x)[0], unmerged(x)[0], atol=1e-5)
    base_weights = base_run / "best" / "model.safetensors"
    original = base_weights.read_bytes()
    try:
        base_weights.write_bytes(original[:-4] + bytes(4))
        with pytest.raises(CheckpointError, match="has changed since"):
            load_checkpoint(out / "last")
    finally:
        base_weights.write_bytes(original)


def test_a_resumed_lora_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, base_run, chats):
    quiet = dict(progress=False, log=lambda line: None)
    sft(_sft_config(base_run, chats, lora_rank=2), tmp_path / "full", **quiet)
    sft(_sft_config(base_run, chats, lora_rank=2, max_steps=6), tmp_path / "split", **quiet)
    sft(_sft_config(base_run, chats, lora_rank=2), tmp_path / "split", resume=True, **quiet)
    from safetensors.torch import load_file

    full = load_file(str(tmp_path / "full" / "last" / "model.safetensors"))
    split = load_file(str(tmp_path / "split" / "last" / "model.safetensors"))
    assert full.keys() == split.keys() and all(torch.equal(full[k], split[k]) for k in full)


def test_sft_refuses_to_write_into_its_base(base_run, chats):
    from scratchgpt.chat.sft import check_out

    with pytest.raises(ScratchGPTError, match="never writes over its base"):
        check_out(str(base_run), base_run)


# --- talking to it ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, base_run, chats):
    out = tmp_path_factory.mktemp("chat") / "run"
    sft(_sft_config(base_run, chats, max_steps=30), out, progress=False, log=lambda line: None)
    return out


def test_scratchgpt_chat_converses_and_leaves_cleanly_at_the_end_of_input(chat_run):
    from scratchgpt.chat.talk import greedy_replies

    model, tok, _, _ = load_checkpoint(chat_run)
    expected = greedy_replies(model, tok, [[Message("user", "the cat")]], max_new_tokens=200)[0]
    done = subprocess.run([sys.executable, "-m", "scratchgpt", "chat", "--checkpoint", str(chat_run), "--temperature", "0",
                           "--device", "cpu"], input="the cat\nthe é\n/reset\nthe cat\n", capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    replies = [line.split("model> ", 1)[1] for line in done.stdout.splitlines() if "model> " in line]
    assert replies[0] == replies[1] == expected  # /reset: the same first turn again, the same greedy reply
    assert "does not know: 'é'" in done.stderr  # refused, and the conversation went on
    assert "Traceback" not in done.stderr


def test_scratchgpt_chat_refuses_a_model_that_is_not_a_chat_model(base_run):
    done = subprocess.run([sys.executable, "-m", "scratchgpt", "chat", "--checkpoint", str(base_run)], input="",
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "is not a chat model" in done.stderr and "scratchgpt sft" in done.stderr


def test_the_openai_clients_chat_completions_stream_and_whole_give_the_same_text(chat_run):
    openai = pytest.importorskip("openai")
    from serving import running_server

    from scratchgpt.serving.server import create_app

    model, tok, _, _ = load_checkpoint(chat_run)
    with running_server(create_app(model, tok)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the dog"}]
        whole = client.chat.completions.create(model="m", messages=messages, seed=5, temperature=0.9, max_tokens=12)
        parts = client.chat.completions.create(model="m", messages=messages, seed=5, temperature=0.9, max_tokens=12,
                                               stream=True, stream_options={"include_usage": True})
        chunks = list(parts)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert whole.choices[0].message.role == "assistant"
        assert streamed == whole.choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens >= 1
        assert whole.object == "chat.completion" and chunks[0].object == "chat.completion.chunk"
        greedy = client.chat.completions.create(model="m", messages=messages[1:], temperature=0, max_completion_tokens=12,
                                                logprobs=True, top_logprobs=2)
        from scratchgpt.chat.talk import greedy_replies

        assert greedy.choices[0].message.content == greedy_replies(model, tok, [[Message("user", "the dog")]], 12)[0]
        assert len(greedy.choices[0].logprobs.content[0].top_logprobs) == 2
        for bad, param in (([{"role": "robot", "content": "x"}], "role is 'robot'"), ([], "non-empty list"),
                           ([{"role": "user", "content": "the cat " * 20}], "context")):
            with pytest.raises(openai.BadRequestError, match=param):
                client.chat.completions.create(model="m", messages=bad)


def test_chat_completions_on_a_model_that_is_not_a_chat_model_is_a_400(base_run):
    from fastapi.testclient import TestClient

    from scratchgpt.serving.server import BatchingLimits, create_app

    model, tok, _, _ = load_checkpoint(base_run)
    with TestClient(create_app(model, tok, batching=BatchingLimits(own_process=False))) as client:
        answer = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 400 and "not a chat model" in answer.json()["error"]["message"]


def test_the_jinja_template_names_every_role_token():
    assert all(t in JINJA or t == "<|system|>" or t == "<|user|>" for t in CHAT_TOKENS)


# --- the template in other tools --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def decisive_chat_run(chat_run, tmp_path_factory):
    """The chat run with a sharpened model, so that greedy choices are far from ties between two implementations."""
    from conftest import sharpen

    from scratchgpt.checkpoint import save_checkpoint

    model, tok, config, meta = load_checkpoint(chat_run)
    out = tmp_path_factory.mktemp("sharp") / "ckpt"
    save_checkpoint(out, sharpen(model), tok, config, {"step": meta["step"]})
    return out


def test_transformers_apply_chat_template_on_the_export_gives_our_ids_and_reply(tmp_path, decisive_chat_run):
    transformers = pytest.importorskip("transformers")
    from scratchgpt.chat.talk import greedy_replies
    from scratchgpt.interop.hf import export_hf

    export_hf(decisive_chat_run, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model, tok, _, _ = load_checkpoint(decisive_chat_run)
    messages = [{"role": "system", "content": "be"}, {"role": "user", "content": "the cat"},
                {"role": "assistant", "content": "tac"}, {"role": "user", "content": "a dog"}]
    for generation_prompt in (False, True):
        ours = render(as_messages(messages), tok, add_generation_prompt=generation_prompt).ids
        theirs = hf_tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False)
        assert list(theirs) == ours
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    plain = [{"role": "user", "content": "the cat"}]
    ids = hf_tok.apply_chat_template(plain, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == render(as_messages(plain), tok, add_generation_prompt=True).ids
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    end = tok.special_id("<|end|>")
    reply = tok.decode(out[: out.index(end)] if end in out else out)
    assert reply == greedy_replies(model, tok, [as_messages(plain)], max_new_tokens=8)[0]


def test_the_exported_chat_tokenizer_imports_back_with_its_role_tokens(tmp_path, chat_run):
    pytest.importorskip("transformers")
    from scratchgpt.interop.hf import export_hf, import_hf

    export_hf(chat_run, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "back")
    _, tok, _, _ = load_checkpoint(tmp_path / "back")
    _, ours, _, _ = load_checkpoint(chat_run)
    assert tok == ours and tok.special_id("<|end|>") == ours.special_id("<|end|>")


def test_llama_cpps_chat_completion_on_the_gguf_gives_our_greedy_reply(tmp_path, decisive_chat_run):
    llama_cpp = pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    from scratchgpt.chat.talk import greedy_replies
    from scratchgpt.interop.gguf import export_gguf

    result = export_gguf(decisive_chat_run, tmp_path / "chat.gguf")
    modelfile = result.modelfile.read_text()
    assert "<|{{ .Role }}|>{{ .Content }}<|end|>" in modelfile and 'PARAMETER stop "<|end|>"' in modelfile
    model, tok, config, _ = load_checkpoint(decisive_chat_run)
    llm = llama_cpp.Llama(model_path=str(result.path), n_ctx=config.model.block_size, verbose=False, n_threads=2, seed=0)
    messages = [{"role": "user", "content": "the cat"}]
    answer = llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=8)
    assert answer["choices"][0]["message"]["content"] == greedy_replies(model, tok, [as_messages(messages)], 8)[0]
    assert llm.tokenize(b"<|user|>", add_bos=False, special=True) == [tok.special_id("<|user|>")]


def test_a_lora_run_exports_merged_with_the_unmerged_logits(tmp_path, base_run, chats):
    transformers = pytest.importorskip("transformers")
    from scratchgpt.interop.hf import export_hf

    out = tmp_path / "lora"
    sft(_sft_config(base_run, chats, lora_rank=2, lora_alpha=4), out, progress=False, log=lambda line: None)
    unmerged, _, _, _ = load_checkpoint(out / "last", merge_lora=False)
    with torch.no_grad():  # a trained adapter's update is small: make it large, so that a wrong merge shows
        for name in adapter_state(unmerged):
            unmerged.get_parameter(name).normal_(0, 0.3)
    from scratchgpt.checkpoint import save_checkpoint

    _, tok, config, meta = load_checkpoint(out / "last", merge_lora=False)
    save_checkpoint(out / "big", unmerged, tok, config, {"step": 1, "lora": meta["lora"]})
    export_hf(out / "big", tmp_path / "hf")
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(tok.vocab_size, (2, 10))
    with torch.no_grad():
        assert torch.allclose(hf_model(x).logits, unmerged(x)[0], atol=1e-5)


def test_train_init_from_with_lora_on_plain_text(tmp_path, base_run, small_corpus):
    done = subprocess.run([sys.executable, "-m", "scratchgpt", "train", "--init-from", str(base_run), "--data", str(small_corpus),
                           "--lora-rank", "2", "--max-steps", "4", "--eval-interval", "4", "--eval-iters", "1",
                           "--sample-tokens", "0", "--dtype", "float32", "--device", "cpu", "--no-progress",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "trainable: LoRA rank 2" in done.stdout + done.stderr
    meta = json.loads((tmp_path / "run" / "last" / "meta.json").read_text())
    assert meta["lora"]["base_sha256"] and load_checkpoint(tmp_path / "run")[2].train.lora_rank == 2


def test_ctrl_c_leaves_scratchgpt_chat_cleanly(chat_run):
    import signal
    import time

    chat = subprocess.Popen([sys.executable, "-m", "scratchgpt", "chat", "--checkpoint", str(chat_run), "--device", "cpu"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        banner = ""
        while "talking to" not in banner and time.monotonic() < deadline:
            banner += chat.stderr.readline()
        time.sleep(0.5)  # into input()
        chat.send_signal(signal.SIGINT)
        _, err = chat.communicate(timeout=30)
    finally:
        chat.kill()
    assert chat.returncode == 0 and "Traceback" not in err


def test_chat_completions_with_n_samples_each_get_a_message(chat_run):
    from fastapi.testclient import TestClient

    from scratchgpt.serving.server import BatchingLimits, create_app

    model, tok, _, _ = load_checkpoint(chat_run)
    with TestClient(create_app(model, tok, batching=BatchingLimits(own_process=False))) as client:
        answer = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "the cat"}], "n": 3,
                                                           "seed": 2, "max_tokens": 6, "stop": ["zz"]}).json()
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    assert all(c["message"]["role"] == "assistant" and c["finish_reason"] in ("stop", "length") for c in answer["choices"])
    assert answer["usage"]["completion_tokens"] == sum(
        len(tok.encode(c["message"]["content"])) + (c["finish_reason"] == "stop") for c in answer["choices"])


def test_eval_of_a_chat_model_scores_its_held_out_replies(chat_run):
    done = subprocess.run([sys.executable, "-m", "scratchgpt", "eval", "--checkpoint", str(chat_run), "--json", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    from scratchgpt.chat.data import chat_data_from_config

    model, tok, config, _ = load_checkpoint(chat_run)
    chats = chat_data_from_config(config.data, tok, config.model.block_size, log=lambda m: None)
    expected = chats.evaluate(model, torch.device("cpu"))
    assert result["val_loss"] == pytest.approx(expected.val_loss, rel=1e-6) and "validation conversations" in done.stderr
    # the bits are spread over the replies' characters, and an <|end|> carries none
    replies = [m.content for line in _conversations() for m in as_messages(line["messages"]) if m.role == "assistant"]
    assert result["val_chars"] == sum(len(r) for r in replies[-len(chats.val):])


def test_a_missing_conversation_file_is_named_as_jsonl(tmp_path):
    from scratchgpt.chat.conversations import read_conversations

    with pytest.raises(DataError, match=r"conversation file .*missing.jsonl does not exist; pass --data a .jsonl file"):
        read_conversations(str(tmp_path / "missing.jsonl"))
