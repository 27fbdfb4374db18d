"""Text files -> packed token shards on disk -> reproducible training batches.

`pack_corpus` tokenizes every document, appends EOS after each, and writes one flat token array per
split (`train.bin`, `heldout.bin`) plus `meta.json`. `TokenBatches` memory-maps a shard and serves
batch i as a pure function of (seed, i), so a trainer resumed at step k sees exactly the batches it
would have seen without stopping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

SUFFIXES = (".txt", ".jsonl")
MAX_DOC_CHARS = 2000  # paragraphs of a .txt file are grouped into documents up to about this size
ENCODE_BATCH = 256  # documents sent to the tokenizer at once


def list_files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """The text files named by `paths`: files as given, folders searched recursively (sorted)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise ValueError(f"{path} does not exist")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            if not found:
                raise ValueError(f"folder {path} has no .txt or .jsonl files")
            files.extend(found)
        else:
            files.append(path)
    return files


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8: bad byte at offset {e.start}") from None


def _text_documents(text: str) -> Iterator[str]:
    """Split on blank lines, then group consecutive paragraphs up to MAX_DOC_CHARS characters.

    A single paragraph longer than that stays one document; it is never cut.
    """
    doc = ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        if doc and len(doc) + 2 + len(para) > MAX_DOC_CHARS:
            yield doc
            doc = ""
        doc = f"{doc}\n\n{para}" if doc else para
    if doc:
        yield doc


def _jsonl_documents(text: str, path: Path) -> Iterator[str]:
    """One document per line: the line's "text" field."""
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{path}:{lineno} has no string "text" field')
        if record["text"]:
            yield record["text"]


def read_documents(paths: str | Path | Iterable[str | Path]) -> Iterator[str]:
    """Documents of the files and folders in `paths`, in a fixed order.

    .jsonl files give one document per line ("text" field); other files are plain text, split into
    documents of grouped paragraphs.
    """
    for path in list_files(paths):
        text = _read_utf8(path)
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(text, path)
        else:
            yield from _text_documents(text)


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned integer type holding ids 0..vocab_size-1."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def pack_corpus(
    paths: str | Path | Iterable[str | Path],
    tokenizer,
    out_dir: str | Path,
    heldout_fraction: float = 0.01,
    seed: int = 0,
) -> dict:
    """Tokenize the documents of `paths` into `out_dir/{train,heldout}.bin` and `meta.json`.

    Each document becomes its tokens followed by EOS. A document goes to heldout with probability
    `heldout_fraction`, drawn from a generator seeded by `seed`, so the split is reproducible.
    Everything is written into a temporary folder next to `out_dir` and renamed at the end: a
    crash leaves no `out_dir` at all rather than a half-written one. Returns the metadata.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ValueError(f"{out_dir} already exists; remove it or choose another folder")
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos token")
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    files = list_files(paths)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        rng = np.random.default_rng(seed)
        tokens = {"train": 0, "heldout": 0}
        documents = {"train": 0, "heldout": 0}
        with open(tmp / "train.bin", "wb") as train_f, open(tmp / "heldout.bin", "wb") as heldout_f:
            shards = {"train": train_f, "heldout": heldout_f}

            def write(docs: list[str]) -> None:
                for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
                    split = "heldout" if rng.random() < heldout_fraction else "train"
                    shards[split].write(np.array(ids + [eos_id], dtype=dtype).tobytes())
                    tokens[split] += len(ids) + 1
                    documents[split] += 1

            batch = []
            for doc in tqdm(read_documents(files), desc=f"packing {out_dir.name}", unit=" docs"):
                batch.append(doc)
                if len(batch) == ENCODE_BATCH:
                    write(batch)
                    batch = []
            if batch:
                write(batch)

        if tokens["train"] == 0:
            raise ValueError(f"no training documents in {[str(f) for f in files]}")
        if heldout_fraction > 0 and tokens["heldout"] == 0:
            raise ValueError(
                f"heldout_fraction={heldout_fraction} put none of the {documents['train']} "
                "documents in heldout; raise it or add text"
            )
        meta = {
            "dtype": dtype.name,
            "vocab_size": vocab_size,
            "eos_id": eos_id,
            "train_tokens": tokens["train"],
            "heldout_tokens": tokens["heldout"],
            "train_documents": documents["train"],
            "heldout_documents": documents["heldout"],
            "heldout_fraction": heldout_fraction,
            "seed": seed,
            "sources": [str(f) for f in files],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


class TokenBatches:
    """Batches of `seq_len`-token windows from one packed shard; `batch(i)` depends only on (seed, i).

    `path` is a shard file, or a folder written by `pack_corpus` (then `split` picks the shard).
    The shard is cut into non-overlapping windows. Each epoch visits every window once, in an order
    shuffled by a generator seeded with (seed, epoch); batch i takes the windows at positions
    i*batch_size .. (i+1)*batch_size - 1 of that endless sequence of epochs.
    """

    def __init__(
        self, path: str | Path, split: str = "train", seq_len: int = 1024, batch_size: int = 8, seed: int = 0
    ):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        path = Path(path)
        shard = path / f"{split}.bin" if path.is_dir() else path
        meta_path = shard.parent / "meta.json"
        if not shard.is_file():
            raise ValueError(f"no token shard at {shard}")
        if not meta_path.is_file():
            raise ValueError(f"no meta.json next to {shard}; shards are written by pack_corpus")
        dtype = np.dtype(json.loads(meta_path.read_text())["dtype"])
        self.num_tokens = shard.stat().st_size // dtype.itemsize
        if self.num_tokens < seq_len:
            raise ValueError(f"{shard} has {self.num_tokens} tokens, fewer than seq_len={seq_len}")
        self.tokens = np.memmap(shard, dtype=dtype, mode="r", shape=(self.num_tokens,))
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.windows_per_epoch = self.num_tokens // seq_len
        self._orders: dict[int, np.ndarray] = {}  # window order of the last epochs used

    def __len__(self) -> int:
        """Batches per epoch (the last one may run into the next epoch)."""
        return -(-self.windows_per_epoch // self.batch_size)

    def _order(self, epoch: int) -> np.ndarray:
        """Window indices of `epoch` in visiting order, shape (windows_per_epoch,)."""
        if epoch not in self._orders:
            if len(self._orders) == 2:  # consecutive batches need one epoch, or two at a boundary
                del self._orders[next(iter(self._orders))]
            rng = np.random.default_rng((self.seed, epoch))
            self._orders[epoch] = rng.permutation(self.windows_per_epoch)
        return self._orders[epoch]

    def batch(self, i: int) -> torch.Tensor:
        """Batch i as a LongTensor of shape (batch_size, seq_len)."""
        if i < 0:
            raise ValueError(f"batch index must be >= 0, got {i}")
        rows = []
        for g in range(i * self.batch_size, (i + 1) * self.batch_size):
            epoch, k = divmod(g, self.windows_per_epoch)
            start = int(self._order(epoch)[k]) * self.seq_len
            rows.append(self.tokens[start : start + self.seq_len])
        return torch.from_numpy(np.stack(rows).astype(np.int64))
