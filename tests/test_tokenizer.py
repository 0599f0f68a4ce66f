import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from tessera.core.tokenizer import BOS, EOS, PAD, load_tokenizer, train_bpe, train_char

ALPHABET = "abcdefghij KLM\n\t.,;!?'é日"


@pytest.fixture(scope="module")
def bpe(corpus_text):
    return train_bpe(iter([corpus_text, "héllo wörld ✓ 日本語 🙂"]), vocab_size=400)


@pytest.fixture(scope="module")
def char():
    return train_char([ALPHABET])


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_bpe_round_trips_any_unicode(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=ALPHABET))
def test_char_round_trips_its_alphabet_one_token_per_character(char, text):
    ids = char.encode(text)
    assert len(ids) == len(text)
    assert char.decode(ids) == text


def test_special_tokens_and_vocab(char, bpe):
    assert char.vocab_size == len(set(ALPHABET)) + 4  # bos, eos, pad, unk
    for tok in (char, bpe):
        assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
        assert tok.decode([tok.eos_id]) == EOS
    assert bpe.vocab_size == 400


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_saved_tokenizer_loads_in_transformers_and_agrees(tmp_path, kind, char, bpe, corpus_text):
    tok = char if kind == "char" else bpe
    tok.save(tmp_path)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token=BOS, eos_token=EOS, pad_token=PAD)
    text = "abc, déj!\n" if kind == "char" else corpus_text[:500]
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    again = load_tokenizer(tmp_path)
    assert again.hash == tok.hash and again.encode(text) == tok.encode(text)


def test_hash_identifies_the_tokenizer(char):
    assert train_char([ALPHABET]).hash == char.hash
    assert train_char([ALPHABET + "Z"]).hash != char.hash


def test_bpe_vocab_too_small_is_an_error():
    with pytest.raises(ValueError, match="below the 256 bytes"):
        train_bpe(iter(["x"]), vocab_size=100)
