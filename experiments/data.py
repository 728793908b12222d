"""Language-model data: fetch real English text, tokenise it once, stream packed batches.

    from experiments import data
    corpus = data.prepare_corpus(sources=("shakespeare",), cache_dir="~/.cache/ccajax")
    print(corpus.describe())
    for batch in data.PackedBatches(corpus, split="train", batch_size=8, seq_len=256, seed=0):
        ...   # inputs, targets, segment_ids: int32 (8, 256); loss_mask: float32 (8, 256)

Sources (`SOURCES`) come through package registries (see `data_sources.py`); `"excerpt"` is a
committed 194 KB excerpt for tests and quick demos that never touches the network.

Tokenizers: `"byte"` (UTF-8 bytes 0..255) or `"gpt2"` (tiktoken with a local `gpt2.tiktoken`
file, since tiktoken's own download is unreachable here). Two special ids follow the base
vocabulary: BOUNDARY = n_base (256 for bytes, 50256 = `<|endoftext|>` for GPT-2) marks a document
boundary and serves as both BOS and EOS; PAD = n_base + 1 is never a training target.
`vocab_size` is n_base + 2 rounded up to a multiple of 64 for matmul-friendly embeddings: 320 for
bytes, 50304 for GPT-2. Tokens are stored as one memory-mapped file per (sources, tokenizer)
under `cache_dir` (uint8 for bytes, so the whole five-source mix is 36 MB to carry to a machine
without registry access; uint16 for GPT-2), written to a temporary folder and renamed into place,
so an interrupted prepare leaves nothing half-written.

Validation split: whole documents (a play, poem, book, novel or documentation file), chosen by
a seeded hash of their names: the first document in hash order, then each further one that keeps
the validation split within `val_fraction` of the tokens (so at least one document, and above
`val_fraction` only when that first document alone is). It depends on the names, `val_fraction`
and `split_seed` only, not on the stream's seed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from experiments.data_sources import REGISTRY

try:  # tqdm is on the GPU image but not a ccajax dependency; CI runs without it.
    from tqdm import tqdm as _tqdm
except ImportError:
    _tqdm = None

FORMAT_VERSION = 1
DEFAULT_CACHE = "~/.cache/ccajax"
TOKENIZERS = ("byte", "gpt2")
# GPT-2's pre-tokeniser (as in tiktoken's gpt2 encoding).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SOURCES = {name: f"{s.description}; licence: {s.licence}" for name, s in REGISTRY.items()}


def _progress(items, desc):
    return _tqdm(items, desc=desc, unit="doc", leave=False) if _tqdm is not None else items


class ByteTokenizer:
    """UTF-8 bytes: ids 0..255."""

    name, n_base = "byte", 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids) -> str:
        ids = np.asarray(ids)
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class TiktokenTokenizer:
    """GPT-2 BPE from a local `.tiktoken` file (lines of `base64(token) rank`)."""

    name = "gpt2"

    def __init__(self, path: Path):
        import tiktoken   # on the GPU image; optional elsewhere
        with open(path, "rb") as f:
            pairs = [line.split() for line in f if line.strip()]
        ranks = {base64.b64decode(tok): int(rank) for tok, rank in pairs}
        self.n_base = len(ranks)
        self._enc = tiktoken.Encoding(name=path.stem, pat_str=GPT2_PATTERN,
                                      mergeable_ranks=ranks, special_tokens={})

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._enc.encode_ordinary(text), dtype=np.uint16)

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids if i < self.n_base])


def _make_tokenizer(tokenizer: str, tiktoken_file):
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer={tokenizer!r}: expected one of {TOKENIZERS}")
    if tokenizer == "byte":
        if tiktoken_file is not None:
            raise ValueError(f"tiktoken_file={tiktoken_file!r} is only used with tokenizer='gpt2'")
        return ByteTokenizer()
    if tiktoken_file is None or not Path(tiktoken_file).expanduser().is_file():
        raise ValueError(f"tiktoken_file={tiktoken_file!r}: tokenizer='gpt2' needs the path of a "
                         "local gpt2.tiktoken file (tiktoken cannot download it offline)")
    return TiktokenTokenizer(Path(tiktoken_file).expanduser())


def split_documents(names, lengths, val_fraction: float, split_seed: int = 0) -> np.ndarray:
    """(D,) bool: True for validation documents. Documents are ordered by sha256 of
    `f"{split_seed}/{name}"`; the first one is taken, then every further one that keeps the
    validation tokens within `val_fraction` of all tokens."""
    if not 0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction={val_fraction!r}: expected a fraction in (0, 0.5]")
    if len(names) < 2:
        raise ValueError(f"the corpus has {len(names)} document(s): a split by document needs >= 2")
    order = sorted(range(len(names)),
                   key=lambda i: hashlib.sha256(f"{split_seed}/{names[i]}".encode()).digest())
    is_val, taken, target = np.zeros(len(names), bool), 0, val_fraction * float(np.sum(lengths))
    for rank, i in enumerate(order):
        if rank == 0 or taken + lengths[i] <= target:
            is_val[i], taken = True, taken + int(lengths[i])
    return is_val


@dataclass
class Corpus:
    """Token ids of every document, one flat array, and the train/validation split.

    tokens: (N,) uint8 or uint16 (memory-mapped when prepared); document d is
    tokens[doc_starts[d] : doc_starts[d] + doc_lengths[d]]; is_val: (D,) bool.
    """

    tokens: np.ndarray
    doc_starts: np.ndarray
    doc_lengths: np.ndarray
    doc_names: list[str]
    is_val: np.ndarray
    tokenizer: object
    val_fraction: float
    split_seed: int
    sources: list[dict] = field(default_factory=list)
    path: Path | None = None

    @property
    def boundary_id(self) -> int:
        return self.tokenizer.n_base

    @property
    def pad_id(self) -> int:
        return self.tokenizer.n_base + 1

    @property
    def vocab_size(self) -> int:
        return -(-(self.tokenizer.n_base + 2) // 64) * 64

    def split_docs(self, split: str) -> np.ndarray:
        """Indices of the split's documents, ascending."""
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}: expected 'train' or 'val'")
        return np.flatnonzero(self.is_val if split == "val" else ~self.is_val)

    def encode(self, text: str) -> np.ndarray:
        return self.tokenizer.encode(text)

    def decode(self, ids) -> str:
        """Text of token ids; BOUNDARY and PAD are dropped."""
        return self.tokenizer.decode(ids)

    def describe(self) -> str:
        lines = [f"corpus: {', '.join(s['name'] for s in self.sources)}; tokenizer "
                 f"{self.tokenizer.name}, vocab_size {self.vocab_size} ({self.tokenizer.n_base} "
                 f"base ids + BOUNDARY {self.boundary_id} + PAD {self.pad_id}, rounded up to a "
                 f"multiple of 64); cache {self.path}"]
        for s in self.sources:
            lines.append(f"  {s['name']}: {s['documents']} documents, {s['bytes']:,} bytes, "
                         f"{s['tokens']:,} tokens; licence: {s['licence']}")
        for split in ("train", "val"):
            docs = self.split_docs(split)
            names = (": " + ", ".join(self.doc_names[d] for d in docs)) if len(docs) <= 8 else ""
            lines.append(f"  {split}: {len(docs)} documents, "
                         f"{int(self.doc_lengths[docs].sum()):,} tokens{names}")
        lines.append(f"  split: val_fraction {self.val_fraction}, split_seed {self.split_seed}")
        return "\n".join(lines)


def _token_dtype(tok):
    return np.uint8 if tok.n_base <= 256 else np.uint16   # BOUNDARY and PAD are never stored


def _check_sources(sources) -> tuple[str, ...]:
    if isinstance(sources, str) or not sources or not all(isinstance(s, str) for s in sources):
        raise ValueError(f"sources={sources!r}: expected a non-empty tuple of names from "
                         f"{sorted(REGISTRY)}")
    unknown = [s for s in sources if s not in REGISTRY]
    if unknown or len(set(sources)) != len(sources):
        raise ValueError(f"sources={sources!r}: unknown or repeated name(s) {unknown}; valid "
                         f"names: {sorted(REGISTRY)}")
    return tuple(sources)


def _build(corpus_dir: Path, download_dir: Path, sources, tok, tiktoken_file) -> None:
    """Fetches and tokenises `sources` into corpus_dir (tokens.bin + meta.json), atomically."""
    start, dtype = time.time(), _token_dtype(tok)
    tmp = Path(tempfile.mkdtemp(prefix=f".{corpus_dir.name}-", dir=corpus_dir.parent))
    try:
        names, lengths, infos = [], [], []
        with open(tmp / "tokens.bin", "wb") as f:
            for source in sources:
                docs = REGISTRY[source].fetch(download_dir)
                n_bytes = n_tokens = n_docs = 0
                for name, text in _progress(docs, f"tokenising {source}"):
                    ids = tok.encode(text)
                    if len(ids) == 0:
                        continue
                    f.write(ids.astype(dtype).tobytes())
                    names.append(f"{source}/{name}")
                    lengths.append(len(ids))
                    n_bytes += len(text.encode())
                    n_tokens += len(ids)
                    n_docs += 1
                infos.append(dict(name=source, documents=n_docs, bytes=n_bytes, tokens=n_tokens,
                                  licence=REGISTRY[source].licence))
        meta = dict(format=FORMAT_VERSION, tokenizer=tok.name, tiktoken_file=tiktoken_file,
                    sources=infos, doc_names=names, doc_lengths=lengths,
                    prepare_seconds=round(time.time() - start, 1))
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            tmp.rename(corpus_dir)
        except OSError:   # another process finished the same corpus first: keep theirs
            if not (corpus_dir / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_corpus(sources=("shakespeare",), cache_dir=DEFAULT_CACHE, tokenizer: str = "byte",
                   tiktoken_file=None, val_fraction: float = 0.015,
                   split_seed: int = 0) -> Corpus:
    """Fetches (once), tokenises (once) and memory-maps `sources`; later calls reuse the cache.

    Raises ValueError for bad arguments and data_sources.FetchError when a registry command fails
    (the message names the source and the command).
    """
    sources = _check_sources(sources)
    tok = _make_tokenizer(tokenizer, tiktoken_file)
    tiktoken_file = None if tiktoken_file is None else str(Path(tiktoken_file).expanduser())
    vocab_hash = (hashlib.sha256(Path(tiktoken_file).read_bytes()).hexdigest()
                  if tiktoken_file else None)
    key = hashlib.sha256(json.dumps([FORMAT_VERSION, sources, tok.name, vocab_hash]).encode())
    cache = Path(cache_dir).expanduser()
    corpus_dir = cache / f"corpus-{'+'.join(sources)}-{tok.name}-{key.hexdigest()[:10]}"
    if not (corpus_dir / "meta.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        _build(corpus_dir, cache / "downloads", sources, tok, tiktoken_file)
    meta = json.loads((corpus_dir / "meta.json").read_text())
    lengths = np.asarray(meta["doc_lengths"], np.int64)
    return Corpus(
        tokens=np.memmap(corpus_dir / "tokens.bin", dtype=_token_dtype(tok), mode="r"),
        doc_starts=np.concatenate([[0], np.cumsum(lengths)[:-1]]), doc_lengths=lengths,
        doc_names=meta["doc_names"], tokenizer=tok, val_fraction=val_fraction,
        split_seed=split_seed, sources=meta["sources"], path=corpus_dir,
        is_val=split_documents(meta["doc_names"], lengths, val_fraction, split_seed))


class PackedBatches:
    """Packed fixed-length batches of one split, deterministic given `seed`, resumable.

    Each epoch shuffles the split's documents (seeded by seed, epoch) and lays them out as one
    stream, every document preceded by BOUNDARY and one BOUNDARY closing the stream:
    [B d0 B d1 ... B d_{n-1} B]. Row r is the window stream[r*S : r*S + S + 1]; consecutive rows
    overlap by one token, so every stream token but the first is a target exactly once: each
    document's tokens plus one BOUNDARY that ends it. The last row is padded with PAD. An epoch's
    rows are then shuffled (same seed) and read B at a time; the stream of batches runs on across
    epochs (a batch may hold rows of two epochs).

    Each batch is a dict of numpy arrays, b = batch_size // shard_count rows:
      inputs, targets: int32 (b, S), targets[:, t] == inputs[:, t + 1] within a row;
      segment_ids: int32 (b, S), 1, 2, ... per document within a row (the BOUNDARY before a
        document belongs to it), 0 on padding;
      loss_mask: float32 (b, S), 0 where the target is PAD.
    Shard i of `shard_count` yields rows [i*b, (i+1)*b) of each global batch of `batch_size` rows,
    so the shards' batches stacked in order are the unsharded batch.

    epochs: None means infinite for split="train" and one pass for split="val"; an int stops after
    that many epochs, the last batch completed with PAD rows (loss_mask 0) so shapes stay fixed.
    state(): JSON-able dict of ints; PackedBatches(..., state=it) continues at the next batch.
    """

    def __init__(self, corpus: Corpus, split: str = "train", batch_size: int = 8,
                 seq_len: int = 256, seed: int = 0, shard_index: int = 0, shard_count: int = 1,
                 state: dict | None = None, epochs: int | None = None):
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len),
                            ("shard_count", shard_count)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive int")
        if batch_size % shard_count:
            raise ValueError(f"batch_size={batch_size} is not divisible by shard_count="
                             f"{shard_count}: each shard takes batch_size // shard_count rows")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index={shard_index!r}: expected 0 <= shard_index < "
                             f"{shard_count}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed={seed!r}: expected a non-negative int")
        if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
            raise ValueError(f"epochs={epochs!r}: expected None or a positive int")
        self.corpus, self.split, self.seed = corpus, split, int(seed)
        self.docs = corpus.split_docs(split)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rows_per_shard, self.shard_index = batch_size // shard_count, shard_index
        self.epochs = epochs if epochs is not None or split == "train" else 1
        self.tokens_per_epoch = int(corpus.doc_lengths[self.docs].sum()) + len(self.docs)
        self.rows_per_epoch = -(-self.tokens_per_epoch // seq_len)
        self._layouts: dict[int, tuple] = {}
        self._row, self._step = 0, 0
        if state is not None:
            self._restore(state)

    def state(self) -> dict:
        epoch, row = divmod(self._row, self.rows_per_epoch)
        return dict(epoch=epoch, row=row, step=self._step, seed=self.seed, seq_len=self.seq_len)

    def _restore(self, state: dict) -> None:
        want = {"epoch", "row", "step", "seed", "seq_len"}
        if not isinstance(state, dict) or set(state) != want:
            raise ValueError(f"state={state!r}: expected a dict with keys {sorted(want)}, "
                             "as state() returns")
        if (state["seed"], state["seq_len"]) != (self.seed, self.seq_len):
            raise ValueError(f"state={state!r} comes from seed={state['seed']}, seq_len="
                             f"{state['seq_len']}; this stream has seed={self.seed}, "
                             f"seq_len={self.seq_len}")
        if not 0 <= state["row"] < self.rows_per_epoch or state["epoch"] < 0:
            raise ValueError(f"state={state!r}: row must be in [0, {self.rows_per_epoch}) and "
                             "epoch >= 0 for this split")
        self._row = state["epoch"] * self.rows_per_epoch + state["row"]
        self._step = state["step"]

    @property
    def num_batches(self) -> int | None:
        """Batches in the whole stream, None when infinite."""
        if self.epochs is None:
            return None
        return -(-self.epochs * self.rows_per_epoch // self.batch_size)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.num_batches is not None and self._row >= self.epochs * self.rows_per_epoch:
            raise StopIteration
        first = self._row + self.shard_index * self.rows_per_shard
        rows, segs = self._rows(np.arange(first, first + self.rows_per_shard))
        self._row += self.batch_size
        self._step += 1
        targets = rows[:, 1:]
        return dict(inputs=rows[:, :-1], targets=targets, segment_ids=segs[:, :-1],
                    loss_mask=(targets != self.corpus.pad_id).astype(np.float32))

    def _layout(self, epoch: int):
        """Epoch's (stream start of each document's BOUNDARY + the closing one (n+1,), token
        offset minus one per entry (n+1,), row order (rows_per_epoch,))."""
        if epoch not in self._layouts:
            rng = np.random.default_rng([self.seed, epoch, int(self.split == "val")])
            order = self.docs[rng.permutation(len(self.docs))]
            sizes = self.corpus.doc_lengths[order] + 1
            starts = np.concatenate([[0], np.cumsum(sizes)])
            base = np.concatenate([self.corpus.doc_starts[order] - 1, [0]])
            self._layouts = {epoch: (starts, base, rng.permutation(self.rows_per_epoch))}
        return self._layouts[epoch]

    def _rows(self, global_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and segment ids, int32 (n, S + 1), of global row indices (n,)."""
        S, pad = self.seq_len, self.corpus.pad_id
        toks = np.full((len(global_rows), S + 1), pad, np.int32)
        segs = np.zeros((len(global_rows), S + 1), np.int32)
        epochs, within = np.divmod(global_rows, self.rows_per_epoch)
        for epoch in np.unique(epochs):
            if self.epochs is not None and epoch >= self.epochs:
                continue   # rows past the last epoch stay PAD
            sel = epochs == epoch
            starts, base, row_order = self._layout(int(epoch))
            pos = row_order[within[sel]][:, None] * S + np.arange(S + 1)   # stream positions
            doc = np.searchsorted(starts, pos, side="right") - 1
            offset = pos - starts[doc]
            real = pos < starts[-1] + 1                 # the closing BOUNDARY is the last token
            text = real & (offset > 0)
            row_toks = np.where(real, self.corpus.boundary_id, pad)
            row_toks[text] = self.corpus.tokens[(base[doc] + offset)[text]]
            toks[sel] = row_toks
            segs[sel] = np.where(real, doc - doc[:, :1] + 1, 0)
        return toks, segs
