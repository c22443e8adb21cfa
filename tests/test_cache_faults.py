"""The caches of kdq_bench.data and kdq_bench.models on full and read-only disks, and teacher folders that keep the
last good copy: every cache write goes through kdq_bench.files."""
import errno, json, shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from kdq_bench import models
from kdq_bench.data import Corpus, cache_dir, clean_text, load_documents, token_cache_path, tokenize_split
from kdq_bench.files import MANIFEST, MARKER, WriteError
from kdq_bench.models import embedded_teacher, load_teacher, save_teacher, teacher_dir
from kdq_bench.testing import TINY_RECIPE, cache_at
from faults import full_disk, leftovers, read_only

DISK_FULL = (errno.ENOSPC, errno.EFBIG)
NOT_WRITABLE = (errno.EROFS, errno.EACCES)


def write_corpus(folder: Path, n=40, words=400) -> Path:
    "A local corpus of `n` plain-text documents (about 100 KB of tokens once tokenized)."
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    vocab = "the a king queen sword river night day love war crown field horse light dark stone".split()
    for i in range(n):
        (folder / f"d{i:02d}.txt").write_text(f"Document {i}.\n\n" + " ".join(rng.choice(vocab, words)) + ".")
    return folder


@pytest.fixture(scope="module")
def bpe():
    from tokenizers import Tokenizer, decoders, models as tm, pre_tokenizers, trainers
    tok = Tokenizer(tm.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["the king and the queen ride at night"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def one_line(e) -> str:
    s = str(e)
    assert "\n" not in s and s.startswith("cannot write "), s
    return s


# ---------------------------------------------------------------- data caches
def test_token_cache_on_full_disk(tmp_path, bpe):
    src = str(write_corpus(tmp_path / "src"))
    with full_disk(tmp_path) as d, cache_at(d):
        path = token_cache_path(src, "train", bpe, unit_words=0)
        with pytest.raises(WriteError) as e: tokenize_split(src, "train", bpe, unit_words=0)
        assert e.value.errno in DISK_FULL + (None,) and one_line(e.value).startswith(f"cannot write {path}")
        assert leftovers(d) == [] and not path.exists() and not path.with_suffix(".json").exists()


def test_document_cache_on_full_disk(tmp_path):
    write_corpus(tmp_path / "src")
    c = Corpus("faulty", "test", "test", "none", "none", str(tmp_path / "src"), "*.txt", clean_text)
    with full_disk(tmp_path) as d, cache_at(d):
        with pytest.raises(WriteError) as e: load_documents(c)
        assert e.value.errno in DISK_FULL and one_line(e.value).startswith(f"cannot write {d / 'docs'}/faulty-")
        assert leftovers(d) == [] and list((d / "docs").iterdir()) == []


def test_caches_on_read_only_disk(tmp_path, bpe):
    src = str(write_corpus(tmp_path / "src"))
    def fill(w):
        with cache_at(w): tokenize_split(src, "train", bpe, unit_words=0)
    with read_only(tmp_path, fill) as d, cache_at(d):
        a = tokenize_split(src, "train", bpe, unit_words=0)             # a filled cache is only read: fine read-only
        assert np.array_equal(a, tokenize_split(src, "train", bpe, cache=False, unit_words=0))
        path = token_cache_path(src, "validation", bpe, unit_words=0)
        with pytest.raises(WriteError) as e: tokenize_split(src, "validation", bpe, unit_words=0)
        assert e.value.errno in NOT_WRITABLE and one_line(e.value).startswith(f"cannot write {path}: ")
        assert leftovers(d) == []
    with read_only(tmp_path / "2") as d, cache_at(d / "new-cache"):
        with pytest.raises(WriteError) as e: cache_dir()
        assert e.value.errno in NOT_WRITABLE and "set KDQ_BENCH_CACHE to a writable folder" in one_line(e.value)


# ---------------------------------------------------------------- teacher folders
def test_teacher_save_on_full_disk_keeps_previous(tmp_path, tiny_teacher):
    m, tok, info = tiny_teacher.model, tiny_teacher.tokenizer, tiny_teacher.info
    with full_disk(tmp_path, size_kib=160) as d:                    # room for one tiny teacher, not for two
        dest = save_teacher(m, tok, info, d / "teacher")
        assert json.loads((dest / MARKER).read_text())["kind"] == "teacher" and (dest / MANIFEST).exists()
        with pytest.raises(WriteError) as e: save_teacher(m, tok, {**info, "again": True}, d / "teacher")
        assert e.value.errno in DISK_FULL and one_line(e.value).startswith(f"cannot write {d / 'teacher'}")
        assert leftovers(d) == [] and sorted(p.name for p in d.iterdir()) == ["teacher"]
        again = load_teacher(str(dest))                               # the previous teacher is whole
        assert "again" not in json.loads((dest / "teacher.json").read_text())
        assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), m.state_dict().values()))


def test_teacher_save_on_read_only_disk(tmp_path, tiny_teacher):
    with read_only(tmp_path) as d:
        with pytest.raises(WriteError) as e:
            save_teacher(tiny_teacher.model, tiny_teacher.tokenizer, tiny_teacher.info, d / "teacher")
        assert e.value.errno in NOT_WRITABLE and one_line(e.value).startswith(f"cannot write {d / 'teacher'}")
        assert list(d.iterdir()) == []


def test_cached_teacher_on_read_only_disk_loads(tmp_path, tiny_teacher):
    def fill(w): shutil.copytree(tiny_teacher.path, w / "teachers" / tiny_teacher.path.name)
    with read_only(tmp_path, fill) as d, cache_at(d):
        t = embedded_teacher(TINY_RECIPE, progress=False)
        assert t.path == d / "teachers" / tiny_teacher.path.name
        assert all(torch.equal(a, b) for a, b in zip(t.model.state_dict().values(), tiny_teacher.model.state_dict().values()))


def test_save_teacher_refuses_a_users_folder(tmp_path, tiny_teacher):
    (tmp_path / "mine").mkdir(); (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not created by kdq_bench"):
        save_teacher(tiny_teacher.model, tiny_teacher.tokenizer, tiny_teacher.info, tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_retrain_keeps_the_cached_teacher_until_the_new_one_is_saved(tmp_path, tiny_teacher, monkeypatch):
    with cache_at(tmp_path):
        shutil.copytree(tiny_teacher.path, teacher_dir("embedded", TINY_RECIPE))
        monkeypatch.setattr(models, "train_teacher", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("interrupted")))
        with pytest.raises(RuntimeError, match="interrupted"): embedded_teacher(TINY_RECIPE, progress=False, retrain=True)
        t = embedded_teacher(TINY_RECIPE, progress=False)                # still there, whole, not retrained
        assert all(torch.equal(a, b) for a, b in zip(t.model.state_dict().values(), tiny_teacher.model.state_dict().values()))
        assert leftovers(tmp_path) == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupt_cached_teacher_is_rebuilt(tmp_path, tiny_teacher, damage):
    with cache_at(tmp_path):
        dest = teacher_dir("embedded", TINY_RECIPE)
        shutil.copytree(tiny_teacher.path, dest)
        w = dest / ("model.safetensors" if damage != "delete" else "tokenizer.json")
        if damage == "flip":
            b = bytearray(w.read_bytes()); b[-100] ^= 0x01; w.write_bytes(bytes(b))   # one bit of one weight
        elif damage == "truncate": w.write_bytes(w.read_bytes()[:-4])
        else: w.unlink()
        with pytest.warns(UserWarning, match="corrupt"):
            t = embedded_teacher(TINY_RECIPE, progress=False)
        assert all(torch.equal(a, b) for a, b in zip(t.model.state_dict().values(), tiny_teacher.model.state_dict().values()))
        from kdq_bench.files import verify_manifest
        assert verify_manifest(dest) == [] and leftovers(tmp_path) == []
