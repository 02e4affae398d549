"""minigpt: a small, readable GPT package that accompanies the minigpt-book.

Each module holds one concept, in the order the book teaches them:
``functional`` (softmax and cross-entropy from scratch), ``tokenizer``/``bpe`` (characters,
byte-level BPE, GPT-2's tokenizer), ``data`` (dataset registry, verified downloads, token bins),
``attention``/``model`` (attention, the GPT and its modern variants), ``optim`` (AdamW,
schedule, clipping), ``train``/``checkpoint`` (trainer, checkpoints, shipped models),
``generate`` (decoding), ``pretrained`` (GPT-2 weights), ``peft``/``finetune``/``instruct``
(fine-tuning), ``scaling``/``quantize``/``tracking`` (engineering practice), and ``cli``
(``python -m minigpt train | sample | eval | finetune``).
"""

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
    "gpt2_config",
    "stream",
]
__version__ = "0.1.0"
