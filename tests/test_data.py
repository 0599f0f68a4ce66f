import itertools
import json
import shutil

import numpy as np
import pytest
import torch

from tessera.core.data import DataError, ShardReader, StreamingLoader, prepare, read_manifest
from tessera.core.tokenizer import train_char


def all_tokens(manifest, split):
    return np.concatenate(list(ShardReader(manifest).tokens(manifest.shards(split))))


def test_prepare_splits_the_bundled_corpus_90_10(tmp_path):
    from tests.conftest import CORPUS
    text = CORPUS.read_text()
    manifest = prepare([str(CORPUS)], train_char([text]), tmp_path, val_fraction=0.1, shard_tokens=1 << 18)
    assert manifest.tokens("train") == 1_003_854 and manifest.tokens("val") == 111_540
    assert manifest.dtype == "uint16"
    tok = train_char([text])
    assert tok.decode(all_tokens(manifest, "val")[:50].tolist()) == text[1_003_854:1_003_904]


def test_val_inputs_split_by_file(tmp_path, char_tokenizer):
    """With val_inputs every train token comes from the train files and every val token from the val
    files, whole documents each, whatever val_fraction says."""
    rng = np.random.default_rng(0)
    letters = "abcdefgh"
    docs = ["".join(rng.choice(list(letters), int(rng.integers(5, 40)))) for _ in range(7)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:5]))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[5:]))
    manifest = prepare([str(tmp_path / "train.jsonl")], char_tokenizer, tmp_path / "out", val_fraction=0.5,
                       shard_tokens=16, val_inputs=[str(tmp_path / "val.jsonl")])
    eos = [char_tokenizer.eos_id]
    joined = lambda ds: sum(([*char_tokenizer.encode(d), *eos] for d in ds), [])[:-1]  # noqa: E731
    assert all_tokens(manifest, "train").tolist() == joined(docs[:5])
    assert all_tokens(manifest, "val").tolist() == joined(docs[5:])
    assert manifest.sources == [str(tmp_path / "train.jsonl"), str(tmp_path / "val.jsonl")]
    with pytest.raises(DataError, match="val inputs 0"):
        (tmp_path / "empty.txt").write_text("")
        prepare([str(tmp_path / "train.jsonl")], char_tokenizer, tmp_path / "o2", val_inputs=[str(tmp_path / "empty.txt")])


def test_manifest_records_shards_and_tokenizer(prepared, char_tokenizer, corpus_text):
    raw = json.loads((prepared.root / "manifest.json").read_text())
    assert raw["tokenizer_hash"] == char_tokenizer.hash
    assert [s["name"] for s in raw["splits"]["train"]][:2] == ["train-000000.tar", "train-000001.tar"]
    assert prepared.tokens("train") + prepared.tokens("val") == len(corpus_text)
    train = all_tokens(prepared, "train")
    assert char_tokenizer.decode(train.tolist()) == corpus_text[: len(train)]


def test_jsonl_documents_are_joined_with_eos_and_bad_lines_are_named(tmp_path, char_tokenizer):
    good = tmp_path / "docs.jsonl"
    good.write_text('{"text": "ab"}\n\n{"text": "cd"}\n')
    manifest = prepare([str(tmp_path)], char_tokenizer, tmp_path / "out", val_fraction=0.0)
    tokens = all_tokens(manifest, "train").tolist()
    assert tokens == char_tokenizer.encode("ab") + [char_tokenizer.eos_id] + char_tokenizer.encode("cd")
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n{"txt": "y"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no string field 'text'"):
        prepare([str(tmp_path / "bad.jsonl")], char_tokenizer, tmp_path / "o2")
    (tmp_path / "bad.jsonl").write_text('{"text": "x"\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: not valid JSON"):
        prepare([str(tmp_path / "bad.jsonl")], char_tokenizer, tmp_path / "o3")
    with pytest.raises(DataError, match="does not exist"):
        prepare([str(tmp_path / "nope.txt")], char_tokenizer, tmp_path / "o4")


def test_tokenizer_mismatch_is_refused(prepared):
    with pytest.raises(DataError, match="was prepared with tokenizer"):
        read_manifest(prepared.root, train_char(["xyz"]).hash)
    assert read_manifest(prepared.root, prepared.tokenizer_hash).splits == prepared.splits


def epoch_windows(loader):
    n = loader.batches_per_epoch(loader.epoch)
    return [w for x, y in itertools.islice(iter(loader), n) for w in torch.cat([x, y[:, -1:]], 1).tolist()]


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 0), (2, 2), (3, 1)])
def test_ranks_and_workers_get_disjoint_windows_and_equal_batch_counts(prepared, world, workers):
    loaders = [StreamingLoader(prepared, "train", 4, 99, r, world, workers, seed=5) for r in range(world)]
    counts = {ld.batches_per_epoch(0) for ld in loaders}
    assert len(counts) == 1
    per_rank = [epoch_windows(ld) for ld in loaders]
    assert all(len(w) == counts.pop() * 4 if i == 0 else True for i, w in enumerate(per_rank))
    seen = [tuple(w) for ws in per_rank for w in ws]
    assert len(seen) == len(set(seen))  # no window twice across ranks and workers
    train = all_tokens(prepared, "train")
    starts = {tuple(train[i : i + 100].tolist()) for i in range(0, len(train) - 99)}
    assert set(seen) <= starts


def test_one_stream_uses_every_token_once_per_epoch(prepared):
    tokens = prepared.tokens("train")  # 54,000: 6 shards of 9,000
    loader = StreamingLoader(prepared, "train", 5, 89, seed=1)  # 9,000 tokens = 100 windows of 90 per shard
    windows = epoch_windows(loader)
    assert len(windows) * 90 == tokens == 54_000
    assert sorted(np.concatenate(windows).tolist()) == sorted(all_tokens(prepared, "train").tolist())


def test_order_changes_every_epoch_but_is_reproducible(prepared):
    a = StreamingLoader(prepared, "train", 4, 89, seed=9)  # 90-token windows tile each shard
    first = epoch_windows(a)
    second = epoch_windows(a)
    assert first != second and sorted(first) == sorted(second)
    assert epoch_windows(StreamingLoader(prepared, "train", 4, 89, seed=9)) == first
    assert epoch_windows(StreamingLoader(prepared, "train", 4, 89, seed=10)) != first


@pytest.mark.parametrize("workers, stop", [(0, 7), (2, 7), (2, 8), (3, 130)])
def test_resume_replays_exactly_the_remaining_batches(prepared, workers, stop):
    ref = StreamingLoader(prepared, "train", 4, 63, num_workers=workers, seed=3)
    expected = [x for x, _ in itertools.islice(iter(ref), stop + 20)]
    first = StreamingLoader(prepared, "train", 4, 63, num_workers=workers, seed=3)
    for _ in zip(range(stop), first):
        pass
    state = first.state_dict()
    resumed = StreamingLoader(prepared, "train", 4, 63, num_workers=workers, seed=3)
    resumed.load_state_dict(state)
    got = [x for x, _ in itertools.islice(iter(resumed), 20)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected[stop:]))
    other = StreamingLoader(prepared, "train", 4, 63, num_workers=workers + 1, seed=3)
    with pytest.raises(DataError, match="cannot be resumed"):
        other.load_state_dict(state)


def test_too_few_shards_for_the_layout_is_a_clear_error(prepared):
    with pytest.raises(DataError, match="has 6 shard.*need at least 8"):
        StreamingLoader(prepared, "train", 4, 63, rank=0, world_size=4, num_workers=2)


def corrupt_copy(prepared, tmp_path):
    root = tmp_path / "corrupt"
    shutil.copytree(prepared.root, root)
    shard = root / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    return read_manifest(root)


def test_truncated_shard_names_the_shard(prepared, tmp_path):
    manifest = corrupt_copy(prepared, tmp_path)
    loader = StreamingLoader(manifest, "train", 4, 63, seed=0, shuffle=False)
    with pytest.raises(DataError, match="train-000002.tar"):
        epoch_windows(loader)


def test_skip_mode_warns_counts_and_keeps_batch_counts(prepared, tmp_path):
    manifest = corrupt_copy(prepared, tmp_path)
    loader = StreamingLoader(manifest, "train", 4, 63, seed=0, shuffle=False, on_error="skip")
    with pytest.warns(UserWarning, match="train-000002.tar"):
        windows = epoch_windows(loader)
    assert len(windows) == loader.batches_per_epoch(0) * 4
    assert loader.skipped >= 1
