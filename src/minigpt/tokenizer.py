"""Tokenizers: text to integer ids and back.

``CharTokenizer`` maps each distinct character of a corpus to an id (chapter 1).
"""

from __future__ import annotations

from collections.abc import Iterable


class CharTokenizer:
    """One id per character, ids assigned in sorted character order."""

    def __init__(self, chars: Iterable[str]) -> None:
        self.chars: list[str] = sorted(set(chars))
        if not self.chars:
            raise ValueError("CharTokenizer needs at least one character")
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("CharTokenizer takes single characters")
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Build the vocabulary from every character that occurs in ``text``."""
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """Map ``text`` to ids; characters outside the vocabulary raise a ``ValueError``."""
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            unknown = sorted({c for c in text if c not in self.stoi})
            raise ValueError(
                f"characters not in this tokenizer's vocabulary: {unknown!r}; "
                "remove them from the text or build the tokenizer from a corpus that has them"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        """Map ids back to text; an id outside ``range(vocab_size)`` raises a ``ValueError``."""
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            out.append(self.chars[i])
        return "".join(out)

    def to_dict(self) -> dict:
        """A JSON-serialisable description, stored beside checkpoints."""
        return {"type": "char", "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, d: dict) -> CharTokenizer:
        if d.get("type") != "char":
            raise ValueError(f"not a character tokenizer description: type={d.get('type')!r}")
        return cls(d["chars"])
