"""minigpt: a small, readable GPT package that accompanies the minigpt-book.

Each module holds one concept, in the order the book teaches them:
``functional`` (softmax and cross-entropy from scratch), ``tokenizer``/``bpe`` (characters,
byte-level BPE, GPT-2's tokenizer), ``registry`` (the public files the book uses: verified
downloads, mirror, cache), ``data`` (token bins, training batches), ``attention``/``model``
(attention, the KV cache, the GPT and its modern variants), ``optim`` (AdamW, schedule,
clipping, the optimisation step),
``train_config``/``train``/``ddp`` (the trainer, its typed config, data parallelism),
``checkpoint`` (checkpoints and model directories), ``atomic`` (crash-safe file writes),
``generate`` (decoding), ``pretrained`` (GPT-2 weights), ``tuning``/``peft``/``finetune``/
``instruct`` (fine-tuning), ``scaling``/``quantize``/``tracking`` (engineering practice),
``book`` (helpers for the chapters) and ``cli`` (``python -m minigpt train | sample | eval
| finetune``, also the ``minigpt`` console script; the ``finetune`` command's options and
runs are ``finetune_cli``). ``__version__`` is the installed
distribution's version; in a source checkout that is not installed (only on ``sys.path``)
it is read from the checkout's ``pyproject.toml``, marked ``+source``.
"""

import re
from importlib import metadata
from pathlib import Path

from minigpt.checkpoint import load_model
from minigpt.generate import DecodeOptions, generate, stream
from minigpt.model import GPT, GPTConfig, KVCache, gpt2_config
from minigpt.tokenizer import CharTokenizer, Tokenizer

__all__ = [
    "GPT",
    "CharTokenizer",
    "DecodeOptions",
    "GPTConfig",
    "KVCache",
    "Tokenizer",
    "generate",
    "load_model",
    "gpt2_config",
    "stream",
]


def _source_version() -> str:
    """The version in the ``pyproject.toml`` of a source checkout, or ``0+unknown``."""
    try:
        text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text("utf-8")
    except OSError:
        return "0+unknown"
    found = re.search(r'^version = "([^"]+)"', text, flags=re.M)
    return f"{found[1]}+source" if found else "0+unknown"


try:
    __version__ = metadata.version("minigpt")
except metadata.PackageNotFoundError:  # a source checkout on sys.path, not installed
    __version__ = _source_version()
