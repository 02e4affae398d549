"""minigpt: a small, readable GPT package that accompanies the minigpt-book.

Each module holds one concept (see the book's chapters):
``functional`` (softmax, cross-entropy from scratch), ``tokenizer`` (characters, byte-level BPE),
``data`` (dataset registry, verified downloads, token bins), ``model`` (attention, the GPT),
``optim`` (AdamW, schedule, clipping), ``train`` (trainer, checkpoints), ``generate`` (decoding).
"""

__version__ = "0.1.0"
