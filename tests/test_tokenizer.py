import pytest
from transformers import AutoTokenizer

from crv.lm.encode import UnknownCharacterError, encode_text
from crv.lm.load import load_tokenizer
from crv.reasoner.tokenizer import build_tokenizer

TEXT = "Q: (3+4)*-(2)\n3+4=7 => 7*-(2)\nnot (True and False) or x?\n"


def test_round_trip_is_exact():
    tok = build_tokenizer()
    ids = encode_text(tok, TEXT)
    assert ids[0] == tok.bos_token_id != 0
    assert len(ids) == len(TEXT) + 1  # one token per character
    assert tok.decode(ids, skip_special_tokens=True) == TEXT


def test_save_and_load_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    for loaded in (load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)):
        assert loaded.get_vocab() == tok.get_vocab()
        assert loaded.bos_token_id == tok.bos_token_id and loaded.eos_token_id == tok.eos_token_id
        assert loaded.decode(loaded(TEXT, add_special_tokens=False)["input_ids"]) == TEXT


def test_unknown_characters_are_named():
    tok = build_tokenizer()
    with pytest.raises(UnknownCharacterError, match="'é'.*'→'|'→'.*'é'") as err:
        encode_text(tok, "3+4 → é")
    assert set(err.value.chars) == {"é", "→"}
