"""Generated token ids to text deltas: incremental detokenization that holds back a possible stop sequence
or half a character (``TextAssembler``), and the transformers streamer that feeds it (``TokenStreamer``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class TextAssembler:
    """Turns the growing list of generated token ids into text deltas, holding back what could still be the
    start of a stop sequence (OpenAI never returns the stop sequence) or half of a multi-byte character.

    Decoding is incremental (the prefix/read offsets of vLLM's and TGI's detokenizers): each step decodes a
    few tokens from ``prefix_offset`` twice, with and without the newest ones, and appends the difference,
    so a step costs the same at token 500 as at token 5 (decoding every id each step is quadratic). Decoding
    from a few tokens back keeps what a tokenizer does at a word start (SentencePiece's leading space) right."""

    def __init__(self, tokenizer: Any, stop: list[str], lock: threading.Lock | None = None) -> None:
        self.tokenizer = tokenizer
        self.lock = lock or threading.Lock()
        self.stop = stop
        self.longest_stop = max((len(s) for s in stop), default=0)
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.window_sent = 0
        self.emitted = 0
        self.stopped = False
        self.text = ""

    def _decode_new(self, *, final: bool = False) -> str:
        """The text the ids after ``read_offset`` add. A trailing replacement character (maybe a character
        split across tokens: a lossy UTF-8 decode gives one for an unfinished sequence) stays back until more
        ids come or ``final``; the text before it goes out at once (invalid bytes before it never turn into a
        character). ``window_sent`` counts what of this window was sent already."""
        if self.read_offset >= len(self.ids):
            return ""
        with self.lock:
            before = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
            after = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        new = after[len(before) :] if len(after) > len(before) else ""
        if not new:
            return ""
        if new.endswith("\ufffd") and not final:
            stable = new[:-1]
            grown = stable[self.window_sent :]
            self.window_sent = max(self.window_sent, len(stable))
            return grown
        grown = new[self.window_sent :]
        self.prefix_offset, self.read_offset, self.window_sent = self.read_offset, len(self.ids), 0
        return grown

    def add(self, new_ids: list[int]) -> str:
        """Take new token ids; return the text now safe to send (maybe empty)."""
        if self.stopped:
            return ""
        self.ids.extend(new_ids)
        grown = self._decode_new()
        return self._append(grown) if grown else ""

    def _append(self, grown: str) -> str:
        searched_from = max(0, len(self.text) - self.longest_stop + 1)  # earlier text was searched already
        text = self.text + grown
        cut = min((i for i in (text.find(s, searched_from) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = text[:cut]
            return self._flush()
        self.text = text
        safe = len(text)
        for s in self.stop:  # the longest tail that is a prefix of a stop sequence stays back
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    safe = min(safe, len(text) - k)
                    break
        delta = text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return delta

    def _flush(self) -> str:
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta

    def finish(self) -> str:
        """The text still held back, once generation has ended."""
        tail = ""
        if not self.stopped:
            grown = self._decode_new(final=True)
            if grown:
                tail = self._append(grown)
        return tail + self._flush()


class TokenStreamer:
    """transformers ``BaseStreamer``: ``put`` gets the prompt first, then one tensor of new ids per step."""

    def __init__(self, assembler: TextAssembler, on_text: Callable[[str], None] | None) -> None:
        self.assembler = assembler
        self.on_text = on_text
        self.prompt_seen = False
        self.count = 0
        self.last_id: int | None = None

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        ids = [int(i) for i in value.reshape(-1).tolist()]
        self.count += len(ids)
        self.last_id = ids[-1] if ids else self.last_id
        delta = self.assembler.add(ids)
        if delta and self.on_text is not None:
            self.on_text(delta)

    def end(self) -> None:
        pass
