"""The reasoner's character-level tokenizer: a real Hugging Face fast tokenizer.

One token per character of printable ASCII plus newline, and four specials::

    <pad>=0  <s>=1 (BOS)  </s>=2 (EOS)  <unk>=3

BOS is deliberately not id 0 (circuit-tracer skips id 0 when detecting BOS).
The tokenizer is saved with ``save_pretrained`` and loads offline with
``AutoTokenizer.from_pretrained(path)``. Use :func:`encode_text` to turn text into
ids with a clear error for characters outside the vocabulary.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
CHARS = "\n" + "".join(c for c in string.printable if c.isprintable())  # 95 printable ASCII + \n


class UnknownCharacterError(ValueError):
    """Text holds characters the reasoner's vocabulary does not have."""

    def __init__(self, chars: list[str]):
        self.chars = chars
        shown = ", ".join(repr(c) for c in chars)
        super().__init__(f"unknown character(s) for the reasoner's vocabulary: {shown}")


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


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a saved tokenizer from a local directory (offline)."""
    tok = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    tok.padding_side = "left"
    return tok


def unknown_chars(tokenizer: PreTrainedTokenizerFast, text: str) -> list[str]:
    """Characters of ``text`` that the tokenizer has no token for (sorted, unique)."""
    vocab = tokenizer.get_vocab()
    return sorted({c for c in text if c not in vocab})


def encode_text(tokenizer: PreTrainedTokenizerFast, text: str, add_bos: bool = True) -> list[int]:
    """Token ids of ``text`` (BOS first); raises UnknownCharacterError for foreign characters."""
    bad = unknown_chars(tokenizer, text)
    if bad:
        raise UnknownCharacterError(bad)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if add_bos else []) + ids
