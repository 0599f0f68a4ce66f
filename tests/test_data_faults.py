"""Prepared data and its inputs under corruption (issue 16 item 10): flipped bytes in a shard's
token payload, a corrupt .npy header, random damage anywhere in a shard (fuzzed), non-UTF-8
inputs, characters the tokenizer has never seen, hidden files, and shards sized for 8 ranks."""
from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera.core.data import DataError, ShardReader, StreamingLoader, prepare, read_manifest
from tessera.core.data.prepare import input_files, read_documents
from tessera.core.tokenizer import train_char


def damaged(prepared, tmp_path, edit) -> tuple:
    """A copy of the prepared data whose train-000001.tar has been passed through `edit(bytes) -> bytes`."""
    root = tmp_path / "damaged"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(prepared.root, root)
    shard = root / "train-000001.tar"
    shard.write_bytes(edit(bytearray(shard.read_bytes())))
    return read_manifest(root), shard


def payload_offset(data: bytes) -> int:
    """Where the first sample's token array starts (after its .npy header)."""
    start = data.find(b"\x93NUMPY")
    return start + 10 + int.from_bytes(data[start + 8:start + 10], "little")


def read_all(manifest, on_error):
    reader = ShardReader(manifest, on_error)
    return np.concatenate(list(reader.tokens(manifest.shards("train")))), reader.skipped


def test_flipped_token_bytes_are_a_named_error_or_a_counted_skip(prepared, tmp_path):
    def flip(data):
        at = payload_offset(data) + 100
        data[at:at + 2] = b"\xff\xff"  # token id 65535, far outside the char vocabulary
        return bytes(data)

    manifest, shard = damaged(prepared, tmp_path, flip)
    with pytest.raises(DataError, match=rf"{shard.name}.*token id 65535, outside the vocabulary of {manifest.vocab_size}"):
        read_all(manifest, "raise")
    with pytest.warns(UserWarning, match=shard.name):
        tokens, skipped = read_all(manifest, "skip")
    assert skipped == 1 and tokens.max() < manifest.vocab_size
    loader = StreamingLoader(manifest, "train", 4, 63, on_error="skip", shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = [x for x, _ in zip(loader, range(loader.batches_per_epoch(0)))]
    assert len(batches) == loader.batches_per_epoch(0) and loader.skipped == 1


def test_a_corrupt_npy_header_names_the_reason(prepared, tmp_path):
    def garble(data):
        at = data.find(b"\x93NUMPY") + 12
        data[at:at + 8] = b"XXXXXXXX"
        return bytes(data)

    manifest, shard = damaged(prepared, tmp_path, garble)
    with pytest.raises(DataError, match=rf"{shard.name}: ValueError: Cannot parse header"):
        read_all(manifest, "raise")


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(cuts=st.lists(st.tuples(st.integers(0, 20_000), st.binary(min_size=1, max_size=8)), min_size=1, max_size=4),
       truncate=st.none() | st.integers(0, 20_000))
def test_random_damage_to_a_shard_is_a_data_error_or_a_counted_skip(prepared, tmp_path_factory, cuts, truncate):
    def edit(data):
        for at, junk in cuts:
            data[at % len(data):at % len(data) + len(junk)] = junk
        return bytes(data[:truncate]) if truncate is not None else bytes(data)

    manifest, _ = damaged(prepared, tmp_path_factory.mktemp("fuzz"), edit)
    try:
        tokens, _ = read_all(manifest, "raise")
    except DataError as e:
        assert "train-000001.tar: " in str(e) and "\n" not in str(e) and not str(e).endswith(": ")
    else:
        assert tokens.max() < manifest.vocab_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokens, skipped = read_all(manifest, "skip")
    assert tokens.max() < manifest.vocab_size and skipped <= 1


def test_a_non_utf8_file_among_many_is_named(tmp_path, char_tokenizer):
    corpus = tmp_path / "corpus"
    (corpus / "b").mkdir(parents=True)
    for i in range(5):
        (corpus / f"a{i}.txt").write_text("hello there\n" * 3)
    (corpus / "b" / "latin1.txt").write_bytes("first line\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"b/latin1.txt:2: not UTF-8 text \(byte 14 is 0xe9\)"):
        list(read_documents(input_files([str(corpus)])))  # what `tessera tokenizer train` reads
    with pytest.raises(DataError, match=r"latin1.txt:2: not UTF-8"):
        prepare([str(corpus)], char_tokenizer, tmp_path / "out")
    (corpus / "b" / "latin1.txt").unlink()
    (corpus / "b" / "docs.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"docs.jsonl:2: not UTF-8 text"):
        prepare([str(corpus)], char_tokenizer, tmp_path / "out")


def test_unknown_characters_are_counted_and_hidden_files_left_out(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / ".git").mkdir(parents=True)
    (corpus / "a.txt").write_text("abc abc\n")
    (corpus / "b.txt").write_text("ab\u00e9\u00e9 c\u4e2d\n")
    (corpus / ".git" / "index.txt").write_text("zzzz")
    (corpus / ".notes.txt").write_text("yyyy")
    tokenizer = train_char(["abc \n"])
    with pytest.warns(UserWarning, match="3 characters .*unknown token"):
        manifest = prepare([str(corpus)], tokenizer, tmp_path / "out", val_fraction=0.0)
    assert manifest.sources == [str(corpus / "a.txt"), str(corpus / "b.txt")]
    assert manifest.unknown_tokens == 3 and manifest.unknown_chars == "\u00e9\u4e2d"
    assert read_manifest(tmp_path / "out").unknown_tokens == 3


def test_default_shards_feed_8_ranks_even_for_a_small_corpus(tmp_path, corpus_text, char_tokenizer):
    (tmp_path / "small.txt").write_text(corpus_text[:20_000])
    manifest = prepare([str(tmp_path / "small.txt")], char_tokenizer, tmp_path / "out", val_fraction=0.1)
    assert {split: len(shards) for split, shards in manifest.splits.items()} == {"train": 8, "val": 8}
    assert manifest.tokens("train") + manifest.tokens("val") == 20_000
    for rank in range(2):  # the README's 2-rank run validates on this split
        StreamingLoader(manifest, "val", 1, 63, rank=rank, world_size=2)
    tiny = prepare([str(tmp_path / "small.txt")], char_tokenizer, tmp_path / "tiny", val_fraction=0.0003)
    assert [s.tokens for s in tiny.splits["val"]] == [1] * 6  # fewer tokens than shards: one token each
