"""The chat template: how a conversation becomes token ids, and which of them the model learns.

Every message is its role token, its text, and the end-of-turn token:

    <|system|>You are terse.<|end|><|user|>Hi there<|end|><|assistant|>Good day.<|end|>

The role tokens are special tokens after the tokenizer's own vocabulary (tokenizer.SpecialTokens),
so no text encodes to one: a message cannot fake a turn. To ask for a reply, the rendering ends
with `<|assistant|>` and the model writes until it emits `<|end|>`.

Supervised fine-tuning learns only the assistant's tokens and each assistant turn's `<|end|>`
(the loss mask): the model is taught to answer, not to predict what the user will say.

This one function, `render`, is used by training, `scratchgpt chat` and the server; `JINJA` is
the same template for transformers' `apply_chat_template`, llama.cpp and Ollama, and a test
checks that both give the same ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ScratchGPTError
from ..tokenizer import Tokenizer, with_special_tokens

ROLES = ("system", "user", "assistant")
END = "<|end|>"
ROLE_TOKENS = tuple(f"<|{role}|>" for role in ROLES)
CHAT_TOKENS = (*ROLE_TOKENS, END)

JINJA = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class ChatError(ScratchGPTError, ValueError):
    """A conversation the template cannot render: an unknown role, no messages, text that is not a string."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass
class Rendered:
    ids: list[int]
    mask: list[bool]  # True where the model is trained to produce the token: assistant text and its <|end|>


def chat_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer` with the role and end-of-turn tokens (the same tokenizer if it has them already)."""
    if all(t in tokenizer.special_tokens for t in CHAT_TOKENS):
        return tokenizer
    return with_special_tokens(tokenizer, CHAT_TOKENS)


def is_chat_tokenizer(tokenizer: Tokenizer) -> bool:
    return all(t in tokenizer.special_tokens for t in CHAT_TOKENS)


def as_messages(raw: Any, where: str = "messages") -> list[Message]:
    """Validate OpenAI-shaped messages (`[{"role": ..., "content": ...}, ...]`); errors say `where`."""
    if not isinstance(raw, list) or not raw:
        raise ChatError(f"{where} must be a non-empty list of {{\"role\", \"content\"}} objects")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ChatError(f"{where}[{i}] must be an object with \"role\" and \"content\"")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatError(f"{where}[{i}].role is {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatError(f"{where}[{i}].content must be a string")
        messages.append(Message(role, content))
    return messages


def render(messages: Sequence[Message], tokenizer: Tokenizer, add_generation_prompt: bool = False) -> Rendered:
    """The ids of `messages` under the template, and the loss mask (see the module docstring)."""
    ids: list[int] = []
    mask: list[bool] = []
    end = tokenizer.special_id(END)
    for m in messages:
        text = tokenizer.encode(m.content)
        learn = m.role == "assistant"
        ids += [tokenizer.special_id(f"<|{m.role}|>"), *text, end]
        mask += [False, *([learn] * len(text)), learn]
    if add_generation_prompt:
        ids.append(tokenizer.special_id("<|assistant|>"))
        mask.append(False)
    return Rendered(ids, mask)


def end_id(tokenizer: Tokenizer) -> int:
    return tokenizer.special_id(END)
