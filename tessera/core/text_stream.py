"""Token ids in, text out, as they are generated: a byte-level token can end inside a UTF-8
character, and a stop string can arrive split over tokens, so text is released only once it can
no longer change. `tessera generate` prints through it and the server streams through it."""
from __future__ import annotations

from tessera.core.tokenizer import Tokenizer


class TextStream:
    """Holds back what could still become a stop string or a split UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0

    def push(self, token: int) -> tuple[str, bool]:
        """The new text that is safe to send, and whether a stop string ended the completion."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            delta, self.sent = text[self.sent:min(hits)], min(hits)
            return delta, True
        safe = len(text) - self.hold - (1 if text.endswith("\ufffd") else 0)
        delta = text[self.sent:max(safe, self.sent)]
        self.sent += len(delta)
        return delta, False

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids)
        delta, self.sent = text[self.sent:], len(text)
        return delta
