"""From token ids to text that is final: incremental decoding, stop strings and log-probabilities.

`TextStream` follows one sample. Each new token is decoded together with the few tokens before
it (never the whole text again, so the work per token stays the same however long the text
grows), and only the new characters are kept: a character that several byte tokens spell
appears once it is whole. Text that could be the start of a stop string waits; the stop
string itself is never part of the text. `CompletionText` does this for a request's samples and
reports each token's log-probability when asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

MAX_PENDING_TOKENS = 8  # an unfinished character waits for at most this many tokens (UTF-8 needs 4 bytes)


def find_stop(text: str, stops: Sequence[str], begin: int = 0) -> int | None:
    """Index in text where the earliest stop string starts (searching from `begin`), or None."""
    found = [i for s in stops if s and (i := text.find(s, begin)) >= 0]
    return min(found) if found else None


def partial_stop_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string: text that must wait."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class StopMatcher:
    """Finds stop strings in a text that arrives piece by piece, in time linear in the text.

    For each stop string it keeps how much of that string the text's end already matches (the
    Knuth-Morris-Pratt automaton), so each new character costs one step per stop string, never
    a look back over the text: `find_stop` and `partial_stop_length` above are the plain
    references it is tested against.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.fallback = [_prefix_function(s) for s in self.stops]
        self.matched = [0] * len(self.stops)  # characters of each stop the text's end matches
        self.length = 0  # characters fed so far

    def feed(self, piece: str) -> int | None:
        """Add `piece` to the text; where the earliest stop string ending in it starts, or None."""
        found = None
        for offset, char in enumerate(piece):
            for i, stop in enumerate(self.stops):
                n = self.matched[i]
                while n and stop[n] != char:
                    n = self.fallback[i][n - 1]
                n = n + 1 if stop[n] == char else 0
                if n == len(stop):
                    start = self.length + offset + 1 - n
                    found = start if found is None else min(found, start)
                    n = self.fallback[i][n - 1]
                self.matched[i] = n
        self.length += len(piece)
        return found

    @property
    def waiting(self) -> int:
        """Characters at the text's end that could still grow into a stop string (they must wait)."""
        return max(self.matched, default=0)


def _prefix_function(s: str) -> list[int]:
    """pi[i]: the length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    pi = [0] * len(s)
    for i in range(1, len(s)):
        n = pi[i - 1]
        while n and s[i] != s[n]:
            n = pi[n - 1]
        pi[i] = n + 1 if s[i] == s[n] else 0
    return pi


@dataclass
class TextChunk:
    """Text that has become final, and the indices of the tokens whose text begins in it."""

    text: str
    tokens: range


class TextStream:
    """One sequence's generated text, released as it becomes final, ended by a stop string or a stop token
    (such as the chat template's end-of-turn token, which adds no text)."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), stop_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(stop_ids)
        self.stop = [s for s in stop if s]
        self.matcher = StopMatcher(self.stop)
        self.ids: list[int] = []
        self.offsets: list[int] = []  # where each token's text begins in the generated text
        self.text = ""  # the decoded text, possibly beyond what was released
        self._context = 0  # decoding starts at this token: the one before the newest whole characters
        self._context_text = ""  # what ids[_context:_decoded] decode to
        self._known: dict[tuple[int, ...], str] = {}  # what one token, or a token and its context, decode to
        self._decoded = 0  # tokens whose text is in self.text
        self.released = 0  # characters of text released so far
        self.released_tokens = 0
        self.finish_reason: str | None = None

    def add(self, token_id: int) -> TextChunk:
        """Add one generated token; return the text (maybe empty) that became final."""
        if self.finish_reason is not None:
            raise RuntimeError("this text has already ended")
        if token_id in self.stop_ids:
            return self._stop_token(token_id)
        self.offsets.append(len(self.text))
        self.ids.append(token_id)
        cut = self.matcher.feed(self._decode_new())
        if cut is not None:
            self.text = self.text[:cut]
            self.finish_reason = "stop"
            return self._release(cut)
        return self._release(len(self.text) - self.matcher.waiting)

    def _stop_token(self, token_id: int) -> TextChunk:
        """End at a stop token: the text held back so far becomes final, the token itself adds none."""
        cut = self.matcher.feed(self._decode_new(force=True)) if self._decoded < len(self.ids) else None
        if cut is not None:
            self.text = self.text[:cut]
        self.offsets.append(len(self.text))
        self.ids.append(token_id)
        self._decoded = len(self.ids)
        self.finish_reason = "stop"
        return self._release(len(self.text))

    def _decode_new(self, force: bool = False) -> str:
        """Decode the tokens not yet in the text, with one token of context before them (a tokenizer may spell a
        token differently at the start of a text); wait while they end in an unfinished character. The new text."""
        pieces = self._decode(self.ids[self._context:])
        waiting = len(self.ids) - self._decoded
        if pieces.endswith("\ufffd") and waiting < MAX_PENDING_TOKENS and not force:
            return ""
        if len(pieces) <= len(self._context_text) and not force:
            return ""
        new = pieces[len(self._context_text):]
        self.text += new
        self._context = len(self.ids) - 1
        self._context_text = self._decode(self.ids[self._context:])
        self._decoded = len(self.ids)
        return new

    def _decode(self, ids: list[int]) -> str:
        """The tokenizer's decode, remembered for one token or two (the new token and its context, most steps)."""
        if len(ids) > 2:
            return self.tokenizer.decode(ids)
        key = tuple(ids)
        if key not in self._known:
            self._known[key] = self.tokenizer.decode(ids)
        return self._known[key]

    def finish(self, reason: str = "length") -> TextChunk:
        """End the text (the token budget ran out): release everything still held."""
        if self.finish_reason is None:
            self.finish_reason = reason
            if self._decoded < len(self.ids):
                cut = self.matcher.feed(self._decode_new(force=True))
                if cut is not None:  # the last, unfinished character completed a stop string
                    self.text, self.finish_reason = self.text[:cut], "stop"
        return self._release(len(self.text), all_tokens=self.finish_reason != "stop")

    def _release(self, end: int, all_tokens: bool = False) -> TextChunk:
        text = self.text[self.released:end]
        self.released = max(self.released, end)
        first = self.released_tokens
        last = len(self.ids) if all_tokens else first
        if not all_tokens:
            while last < len(self.ids) and self.offsets[last] < self.released:
                last += 1
        self.released_tokens = last
        return TextChunk(text, range(first, last))


@dataclass
class TokenDetail:
    """One generated token as the model saw it: its text, log-probability and the top alternatives."""

    text: str
    offset: int  # where its text begins in the generated text
    logprob: float
    top: dict[str, float] = field(default_factory=dict)  # alternative token text -> log-probability


@dataclass
class CompletionChunk:
    """New final text of one sample, the details of its tokens, and why it ended (once it has)."""

    index: int
    text: str
    tokens: list[TokenDetail]
    finish_reason: str | None = None
    generated: int = 0  # tokens this sample has generated so far


def token_details(tokenizer, logits: torch.Tensor, chosen: int, offset: int, n_top: int) -> TokenDetail:
    """Log-probabilities of the model's own distribution (logits (V,), before temperature, penalties, filters)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (V,)
    values, ids = torch.topk(logprobs, min(n_top, logprobs.numel()))
    top = {tokenizer.decode([int(i)]): float(v) for v, i in zip(values, ids, strict=True)}
    top.setdefault(tokenizer.decode([chosen]), float(logprobs[chosen]))  # the chosen one is always listed
    return TokenDetail(tokenizer.decode([chosen]), offset, float(logprobs[chosen]), top)


class CompletionText:
    """The samples' text as their tokens arrive: each step's new final text, cut at stop strings."""

    def __init__(self, tokenizer, settings):
        self.tokenizer = tokenizer
        self.logprobs = settings.logprobs
        self.streams = [TextStream(tokenizer, settings.stop, settings.stop_ids) for _ in range(settings.num_samples)]
        self.details: list[list[TokenDetail]] = [[] for _ in self.streams]

    @property
    def done(self) -> bool:
        """Every sample has ended at a stop string."""
        return all(s.finish_reason is not None for s in self.streams)

    def feed(self, ids: list[int], logits: torch.Tensor | None = None) -> list[CompletionChunk]:
        """The chunks of new text (and token details) these tokens (one per sample) make final."""
        chunks = []
        for i, stream in enumerate(self.streams):
            if stream.finish_reason is not None:  # ended at a stop string; its row runs on unused
                continue
            if self.logprobs is not None and logits is not None:
                self.details[i].append(token_details(self.tokenizer, logits[i], ids[i], len(stream.text), self.logprobs))
            chunk = stream.add(ids[i])
            if chunk.text or chunk.tokens or stream.finish_reason:
                chunks.append(self._chunk(i, chunk))
        return chunks

    def finish(self, reason: str = "length") -> list[CompletionChunk]:
        """The last chunk of each sample that has not ended at a stop string."""
        return [self._chunk(i, s.finish(reason)) for i, s in enumerate(self.streams) if s.finish_reason is None]

    def _chunk(self, index: int, chunk: TextChunk) -> CompletionChunk:
        details = self.details[index]
        tokens = [details[t] for t in chunk.tokens if t < len(details)]  # no details unless logprobs were asked for
        stream = self.streams[index]
        return CompletionChunk(index, chunk.text, tokens, stream.finish_reason, len(stream.ids))
