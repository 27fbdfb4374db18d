import json

import numpy as np
import pytest
import torch

from twotower.data import ENCODE_BATCH, MAX_DOC_CHARS, TokenBatches, pack_corpus, read_documents
from twotower.tokenizer import EOS_ID, train_tokenizer

TRAINING_TEXT = "Once upon a time a little cat sat on a red mat. The dog ran to the sun.\n" * 50


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    (tmp / "train.txt").write_text(TRAINING_TEXT)
    return train_tokenizer([tmp / "train.txt"], tmp / "tokenizer", vocab_size=300)


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


def story(i: int) -> str:
    return f"Story {i}: the cat number {i} sat on mat {i * 7}.\nIt was happy."


def split_documents(tokenizer, shard) -> list[str]:
    """Decode a shard back into its documents, cutting after every EOS."""
    ids = np.fromfile(shard, dtype=np.uint16).tolist()
    assert ids and ids[-1] == EOS_ID
    docs, start = [], 0
    for end in [k for k, t in enumerate(ids) if t == EOS_ID]:
        docs.append(tokenizer.decode(ids[start:end]))
        start = end + 1
    return docs


def test_read_documents_files_and_folders(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    paragraphs = [f"paragraph {i} " + "x" * 900 for i in range(5)]
    (corpus / "a.txt").write_text("\n\n".join(paragraphs) + "\n")
    write_jsonl(corpus / "sub" / "b.jsonl", ["first record", "second\n\nrecord"])
    (corpus / "notes.md").write_text("not a corpus file")

    docs = list(read_documents(corpus))
    # paragraphs of ~910 characters: two fit in one document, a third would pass MAX_DOC_CHARS
    assert docs[:3] == ["\n\n".join(paragraphs[0:2]), "\n\n".join(paragraphs[2:4]), paragraphs[4]]
    assert all(len(d) <= MAX_DOC_CHARS for d in docs)
    assert docs[3:] == ["first record", "second\n\nrecord"]
    assert list(read_documents([corpus / "sub" / "b.jsonl", corpus / "a.txt"])) == docs[3:] + docs[:3]


def test_pack_puts_eos_after_every_document(tokenizer, tmp_path):
    docs = [story(i) for i in range(20)]
    write_jsonl(tmp_path / "docs.jsonl", docs)
    meta = pack_corpus([tmp_path / "docs.jsonl"], tokenizer, tmp_path / "packed", heldout_fraction=0.0)

    shard = tmp_path / "packed" / "train.bin"
    assert split_documents(tokenizer, shard) == docs
    assert meta == json.loads((tmp_path / "packed" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["eos_id"] == EOS_ID and meta["vocab_size"] == 300
    assert meta["train_tokens"] == shard.stat().st_size // 2
    assert meta["train_documents"] == 20 and meta["heldout_tokens"] == 0
    assert meta["sources"] == [str(tmp_path / "docs.jsonl")]


def test_heldout_split_is_disjoint_and_deterministic(tokenizer, tmp_path):
    docs = [story(i) for i in range(100)]
    write_jsonl(tmp_path / "docs.jsonl", docs)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        pack_corpus(tmp_path / "docs.jsonl", tokenizer, tmp_path / name, heldout_fraction=0.2, seed=seed)

    train = split_documents(tokenizer, tmp_path / "a" / "train.bin")
    heldout = split_documents(tokenizer, tmp_path / "a" / "heldout.bin")
    assert 5 <= len(heldout) <= 40
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(docs)
    for split in ("train.bin", "heldout.bin"):
        assert (tmp_path / "a" / split).read_bytes() == (tmp_path / "b" / split).read_bytes()
    assert (tmp_path / "a" / "heldout.bin").read_bytes() != (tmp_path / "c" / "heldout.bin").read_bytes()


@pytest.fixture
def packed(tokenizer, tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", [story(i) for i in range(60)])
    pack_corpus(tmp_path / "docs.jsonl", tokenizer, tmp_path / "packed", heldout_fraction=0.1)
    return tmp_path / "packed"


def test_batches_are_a_pure_function_of_seed_and_index(packed):
    data = TokenBatches(packed, "train", seq_len=16, batch_size=4, seed=0)
    tokens = torch.from_numpy(np.fromfile(packed / "train.bin", dtype=np.uint16).astype(np.int64))
    assert data.num_tokens == len(tokens)

    first = [data.batch(i) for i in range(3 * len(data))]
    fresh = TokenBatches(packed / "train.bin", seq_len=16, batch_size=4, seed=0)
    for i in (7, 0, 2 * len(data) + 1, 3):  # out of order, across epochs
        assert torch.equal(fresh.batch(i), first[i])
    assert first[0].shape == (4, 16) and first[0].dtype == torch.long
    assert not torch.equal(TokenBatches(packed, "train", 16, 4, seed=1).batch(0), first[0])

    # one epoch visits every non-overlapping window once
    windows = tokens[: data.windows_per_epoch * 16].view(-1, 16)
    epoch = torch.cat(first[: len(data)])[: data.windows_per_epoch]
    assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, windows.tolist()))
    # and the next epoch visits them in another order
    next_epoch = torch.cat(first)[data.windows_per_epoch : 2 * data.windows_per_epoch]
    assert sorted(map(tuple, next_epoch.tolist())) == sorted(map(tuple, windows.tolist()))
    assert not torch.equal(next_epoch, epoch)


def test_heldout_batches_and_short_shard(packed):
    heldout = TokenBatches(packed, "heldout", seq_len=8, batch_size=2)
    assert heldout.batch(0).shape == (2, 8)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        TokenBatches(packed, "heldout", seq_len=heldout.num_tokens + 1, batch_size=2)


def test_clear_errors(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        list(read_documents(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no corpus here")
    with pytest.raises(ValueError, match="no .txt or .jsonl files"):
        list(read_documents(tmp_path / "empty"))
    (tmp_path / "latin1.txt").write_bytes("fine text\n\ncaf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not valid UTF-8.*offset 14"):
        list(read_documents(tmp_path / "latin1.txt"))
    with pytest.raises(ValueError, match="does not exist"):
        pack_corpus(tmp_path / "missing", tokenizer, tmp_path / "out")


def test_failed_pack_leaves_no_dataset(tokenizer, tmp_path):
    """A failure after some shards were written leaves neither the dataset nor temporary files."""
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", [story(i) for i in range(ENCODE_BATCH + 10)])
    (src / "b.txt").write_bytes(b"good start \xff\xfe bad bytes")
    out_root = tmp_path / "datasets"
    with pytest.raises(ValueError, match="b.txt is not valid UTF-8"):
        pack_corpus(src, tokenizer, out_root / "packed")
    assert list(out_root.iterdir()) == []

    (src / "b.txt").unlink()
    pack_corpus(src, tokenizer, out_root / "packed")
    assert sorted(p.name for p in out_root.iterdir()) == ["packed"]
    with pytest.raises(ValueError, match="already exists"):
        pack_corpus(src, tokenizer, out_root / "packed")
