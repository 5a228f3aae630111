"""The reasoner's character-level tokenizer: a real Hugging Face fast tokenizer.

One token per character of printable ASCII plus newline, and four specials::

    <pad>=0  <s>=1 (BOS)  </s>=2 (EOS)  <unk>=3

BOS is deliberately not id 0 (circuit-tracer skips id 0 when detecting BOS).
The tokenizer is saved with ``save_pretrained`` and loads offline with
``AutoTokenizer.from_pretrained(path)`` (or :func:`crv.lm.load.load_tokenizer`). Text goes
through :mod:`crv.lm.encode` like any other tokenizer's: a character outside the vocabulary
becomes ``<unk>``, which :func:`crv.lm.encode.tokenize` reports as an error.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
CHARS = "\n" + "".join(c for c in string.printable if c.isprintable())  # 95 printable ASCII + \n


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Create the character-level tokenizer from scratch."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for c in CHARS:
        vocab[c] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )
    tok.padding_side = "left"  # generation pads on the left
    return tok
