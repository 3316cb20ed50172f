"""Tests of asteria.train.corpus: determinism, exclusions, split, batches."""

import pytest
import torch

from asteria.train import corpus as corpus_mod
from asteria.train.corpus import is_excluded, list_source_files, load_corpus, train_batch, val_batches

SMALL = 200_000


@pytest.fixture(scope="module")
def small_corpus():
    return load_corpus(max_bytes=SMALL)


def test_same_corpus_every_time(small_corpus):
    again = load_corpus(max_bytes=SMALL)
    assert again.fingerprint() == small_corpus.fingerprint()
    assert again.train_files == small_corpus.train_files
    assert torch.equal(again.train, small_corpus.train)


def test_split_is_disjoint_sorted_and_capped(small_corpus):
    assert small_corpus.train_files and small_corpus.val_files
    assert not set(small_corpus.train_files) & set(small_corpus.val_files)
    assert list(small_corpus.train_files) == sorted(small_corpus.train_files)
    assert list(small_corpus.val_files) == sorted(small_corpus.val_files)
    headers = sum(len(f"# file: {f}\n") + 1 for f in small_corpus.train_files + small_corpus.val_files)
    assert small_corpus.train.numel() + small_corpus.val.numel() <= SMALL + headers
    assert small_corpus.val.numel() < small_corpus.train.numel()
    assert small_corpus.train.dtype == torch.uint8 and small_corpus.vocab_size == 256


def test_text_is_the_source_files(small_corpus):
    text = bytes(small_corpus.train.tolist())
    first = small_corpus.train_files[0]
    assert text.startswith(f"# file: {first}\n".encode())
    source = (corpus_mod.stdlib_root() / first).read_bytes()
    assert source[:200] in text


def test_exclusion_rules():
    assert is_excluded("site-packages/numpy/__init__.py")
    assert is_excluded("test/test_os.py")
    assert is_excluded("unittest/test/test_case.py")
    assert is_excluded("idlelib/idle_test/test_x.py")
    assert is_excluded("encodings/cp1252.py")
    assert is_excluded("_sysconfigdata__linux_x86_64-linux-gnu.py")
    assert is_excluded("config-3.11-x86_64-linux-gnu/python-config.py")
    assert not is_excluded("json/decoder.py")
    assert not is_excluded("os.py")
    assert not is_excluded("email/encoders.py")


def test_scan_of_a_tree(tmp_path):
    for rel, text in {
        "b.py": "b = 2\n",
        "a.py": "a = 1\n",
        "pkg/mod.py": "x = 3\n" * 500,
        "pkg/tests/test_mod.py": "assert True\n",
        "site-packages/third.py": "third = 1\n",
        "notes.txt": "not python\n",
    }.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    files = [name for name, _ in list_source_files(tmp_path)]
    assert files == ["a.py", "b.py", "pkg/mod.py"]
    c = load_corpus(max_bytes=8192, val_fraction=0.1, root=tmp_path)
    assert sorted(c.train_files + c.val_files) == sorted(set(c.train_files + c.val_files))
    assert len(c.val_files) >= 1 and len(c.train_files) >= 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_bytes"):
        load_corpus(max_bytes=10)
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(val_fraction=0.9)


def test_empty_tree_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not enough Python source"):
        load_corpus(root=tmp_path)


def test_train_batch_depends_only_on_seed_and_step(small_corpus):
    x1, y1 = train_batch(small_corpus.train, 4, 32, seed=1, step=7)
    x2, y2 = train_batch(small_corpus.train, 4, 32, seed=1, step=7)
    x3, _ = train_batch(small_corpus.train, 4, 32, seed=1, step=8)
    assert x1.shape == y1.shape == (4, 32) and x1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the next bytes
    assert int(x1.max()) < 256


def test_val_batches_are_fixed(small_corpus):
    a = val_batches(small_corpus.val, 4, 32, max_batches=3)
    b = val_batches(small_corpus.val, 4, 32, max_batches=3)
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (4, 32)
