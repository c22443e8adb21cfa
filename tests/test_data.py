"Tests of kdq_bench.data: cleaning, splits, the verified token cache, batches, calibration sets, HF and local sources."
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")       # never reach the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import glob, hashlib, json, re, shutil, warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import kdq_bench.data as D
from kdq_bench.data import (CORPORA, SPLITS, Corpus, CorpusUnavailable, batch_at, batches, cache_dir, calibration_set,
                            chunk_documents, clean_markdown, clean_play, clean_rst, encode_documents, eos_token_id,
                            eval_batches, eval_windows, list_corpora, load_documents, load_hf_documents, num_windows,
                            split_documents, token_cache_path, tokenize_split, tokenizer_fingerprint, verify_token_cache)

PLAYS = Path(CORPORA["shakespeare"].root)
PYDOCS = Path(CORPORA["python-docs"].root)
LINUXDOCS = Path(CORPORA["linux-docs"].root)
need_pydocs = pytest.mark.skipif(not CORPORA["python-docs"].available(), reason="apt-get install -y python3.11-doc")
need_linuxdocs = pytest.mark.skipif(not CORPORA["linux-docs"].available(), reason="apt-get install -y linux-doc-6.1")
need_kjv = pytest.mark.skipif(not CORPORA["kjv"].available(), reason="apt-get install -y bible-kjv")


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("kdq_cache")


@pytest.fixture(autouse=True)
def tmp_cache(session_cache, monkeypatch):
    "A cache root shared by this test session only (never the user's); tests that damage caches use their own."
    monkeypatch.setenv("KDQ_BENCH_CACHE", str(session_cache))
    return session_cache


def toy_bpe(texts, vocab=400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def write_docs(folder, n=12, words=60):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    vocab = "the a king queen sword river night day love war crown field horse light dark stone".split()
    texts = []
    for i in range(n):
        paras = [" ".join(rng.choice(vocab, words)) + "." for _ in range(3)]
        texts.append(f"Document number {i}.\n\n" + "\n\n".join(paras))
        (folder / f"doc{i:02d}.txt").write_text(texts[-1])
    return texts


# ---------------------------------------------------------------- cache root

def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("KDQ_BENCH_CACHE", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" and (tmp_path / "x").is_dir()
    monkeypatch.delenv("KDQ_BENCH_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "kdq_bench"


# ---------------------------------------------------------------- cleaning

def test_clean_play_synthetic():
    md = ("# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO and FRANCISCO, two\nSentinels_\n\n"
          "**BERNARDO**  \nWho's there?\n\n**FRANCISCO**  \n_\\[Aside]_  \nNay, answer me: stand, \\--and unfold yourself.  \n"
          "*[Draws.]*  \nLong live the king!\n\n*Exeunt.*\n\n_\\[To HORATIO]_  \n**HAMLET**  \nSo, so.")
    assert clean_play(md) == ("Who's there?\n\nNay, answer me: stand, --and unfold yourself.\nLong live the king!\n\nSo, so.")


def _reference_spoken_lines(raw):
    "Independent line-level reference: every line that is not a heading, speaker, stage direction or list item."
    out, in_italic = [], False
    for line in raw.split("\n"):
        s = re.sub(r"[_*]*\\?\[[^\]]*\][_*]*", "", line.strip()).strip()
        if not s: continue
        if in_italic:
            in_italic = not s.endswith(("_", "*")); continue
        if s.startswith(("#", "**")): continue
        if s[0] in "_*":
            in_italic = not (len(s) > 1 and s.endswith(s[0])); continue
        out.append(s.replace("\\", ""))
    return out


def test_clean_play_real_files_match_reference():
    files = sorted(PLAYS.glob("*/*.md"))
    assert len(files) == 38
    for f in files:
        if f.name == "henry-viii.md": continue  # its coronation procession list is dropped as a block
        raw = f.read_text(); clean = clean_play(raw)
        assert Counter(l for l in clean.split("\n") if l) == Counter(_reference_spoken_lines(raw)), f.name
        assert not re.search(r"\*\*|(^|\s)_|_($|\s)|^#|\\\[", clean, re.M), f.name
    mac = clean_play((PLAYS / "tragedies" / "macbeth.md").read_text())
    assert mac.startswith("When shall we three meet again\nIn thunder, lightning, or in rain?")
    assert "Fair is foul, and foul is fair:" in mac and "Thunder and lightning" not in mac and "First Witch" not in mac


RST = """.. _label:

****************
Title of a page
****************

Prose with :func:`~os.path.join`, :ref:`a reference <target>`, ``literal``, *emphasis*, **strong**,
`a link <https://x.org>`_, a footnote [#]_ and |version|.  Code follows::

    def f(x):
        return x

.. code-block:: python

   print("dropped")

.. index:: single: dropped

.. note::
   A note that is kept.

.. versionchanged:: 3.11
   Changed text kept.

.. method:: Widget.frob(a, b=1)
   :noindex:

   Method body kept.

   .. doctest::

      PS1 1 + 1
      2

PS1 print("doctest dropped")
dropped output

+-----+-----+
| t1  | t2  |
+-----+-----+

=====  =====
a      b
=====  =====
x      y
=====  =====

* Bullet one
  continues here.
* Bullet two with a list in code::

      code after bullet

:Author: dropped field

.. This is a comment
   that spans lines.

Last paragraph.

\tTabbed block quote kept.

...not a comment: a line starting with three dots.
""".replace("PS1", ">>>")


def test_clean_rst_synthetic():
    assert clean_rst(RST).split("\n\n") == [
        "Title of a page",
        "Prose with join, a reference, literal, emphasis, strong, a link, a footnote and . Code follows:",
        "A note that is kept.", "Changed text kept.", "Method body kept.",
        "Bullet one continues here.", "Bullet two with a list in code:", "Last paragraph.",
        "Tabbed block quote kept.", "...not a comment: a line starting with three dots."]


def test_clean_markdown_synthetic():
    md = ("# Heading *one*\n\nText with [link](u) and ![img](i.png) and `code` and <span>html</span>.\n\n"
          "```\nfenced = code\n```\n\n    indented = code\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
          "> quoted **text**\n\n[ref]: http://x\n\n1. first\n2. second\n")
    assert clean_markdown(md).split("\n\n") == ["Heading one", "Text with link and and code and html.", "quoted text",
                                                "first second"]


MARKUP = re.compile(r"(:[\w:-]+:`|``|^\.\. |::$|^>>> (?!The default Python prompt)|^\s*\+[-=+]+\+|^=+\s+=+)", re.M)


@need_pydocs
def test_clean_rst_real_python_docs():
    txt = clean_rst((PYDOCS / "tutorial" / "controlflow.rst.txt").read_text())
    assert "Perhaps the most well-known statement type is the if statement." in txt
    assert "For example:" in txt
    for code in ("Please enter an integer", "print('Negative changed to zero')", "defenestrate 12", "range(0, 10)\n"):
        assert code not in txt
    assert len(CORPORA["python-docs"].files()) == 497
    files = [p for d in ("tutorial", "faq", "reference", "c-api") for p in sorted(PYDOCS.glob(f"{d}/*.rst.txt"))]
    docs = [clean_rst(p.read_text()) for p in files + [PYDOCS / "whatsnew" / "2.5.rst.txt"]]
    bad = [p for d in docs for p in d.split("\n\n") if MARKUP.search(p)]
    assert not bad, bad[:5]


@need_linuxdocs
def test_clean_rst_real_linux_docs():
    txt = clean_rst((LINUXDOCS / "core-api" / "kobject.rst.txt").read_text())
    assert "It is rare for kernel code to create a standalone kobject" in txt
    assert "struct uio_map {" not in txt and ":Author:" not in txt and "=====" not in txt
    rcu = clean_rst((LINUXDOCS / "RCU" / "whatisRCU.rst.txt").read_text())
    assert "void rcu_read_lock(void);" not in rcu and "rcu_read_lock()" in rcu
    files = sorted(LINUXDOCS.glob("core-api/*.rst.txt"))
    bad = [p for f in files for p in clean_rst(f.read_text()).split("\n\n") if MARKUP.search(p)]
    assert not bad, bad[:5]


def test_clean_rst_idempotent_on_plain_prose():
    prose = "A plain paragraph of prose.\n\nAnother one, with a comma."
    assert clean_rst(prose) == prose and clean_markdown(prose) == prose


# ---------------------------------------------------------------- registry

def test_registry_and_missing_corpus():
    names = [r["name"] for r in list_corpora()]
    assert {"shakespeare", "python-docs", "kjv", "linux-docs", "wikitext-2"} <= set(names)
    for r in list_corpora(): assert r["licence"] and r["source"] and r["install"]
    assert CORPORA["shakespeare"].available()
    for name, pkg in [("python-docs", "python3.11-doc"), ("linux-docs", "linux-doc-6.1"), ("kjv", "bible-kjv")]:
        missing = replace(CORPORA[name], root="/nonexistent/kdq")
        assert not missing.available()
        with pytest.raises(CorpusUnavailable, match=f"apt-get install -y {pkg}"): missing.documents()
        with pytest.raises(FileNotFoundError, match=f"apt-get install -y {pkg}"): load_documents(missing, "train")


def test_unknown_corpus_lists_known():
    with pytest.raises(ValueError, match="known corpora are") as e: load_documents("shakespear")
    for n in CORPORA: assert n in str(e.value)
    with pytest.raises(ValueError, match="split must be one of"): load_documents("shakespeare", "dev")


def test_shakespeare_documents():
    docs = load_documents("shakespeare")
    assert len(docs) == 38
    assert docs[[f.name for f in CORPORA["shakespeare"].files()].index("macbeth.md")].startswith("When shall we three")


def test_document_cache_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("KDQ_BENCH_CACHE", str(tmp_path / "own"))
    (tmp_path / "src").mkdir()
    for i in range(4): (tmp_path / "src" / f"{i}.md").write_text(f"# Page {i}\n\nProse *{i}*.\n")
    tiny = Corpus("tiny", "test", "test", "none", "none", str(tmp_path / "src"), "*.md", clean_markdown)
    docs = load_documents(tiny)
    assert docs == [f"Page {i}\n\nProse {i}." for i in range(4)]
    files = list((tmp_path / "own" / "docs").glob("tiny-*.json"))
    assert len(files) == 1
    monkeypatch.setattr(Corpus, "load", lambda self: (_ for _ in ()).throw(AssertionError("re-cleaned")))
    assert load_documents(tiny) == docs                                     # served from the cache
    monkeypatch.undo(); monkeypatch.setenv("KDQ_BENCH_CACHE", str(tmp_path / "own"))
    files[0].write_text(files[0].read_text()[:-10])                          # truncated: detected and rebuilt
    with pytest.warns(UserWarning, match="corrupt"): assert load_documents(tiny) == docs
    obj = json.loads(files[0].read_text()); obj["docs"][0] = "tampered"; files[0].write_text(json.dumps(obj))
    with pytest.warns(UserWarning, match="corrupt"): assert load_documents(tiny) == docs
    (tmp_path / "src" / "4.md").write_text("A new page.")                   # source changed: new fingerprint
    assert load_documents(tiny) == docs + ["A new page."]


@need_kjv
def test_kjv_books_and_verses():
    docs = load_documents("kjv")
    assert len(docs) == 66
    assert docs[0].startswith("In the beginning God created the heaven and the earth.\n")
    assert docs[-1].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert sum(len(d.split("\n\n")) for d in docs) == 1189          # chapters
    assert sum(len([l for l in d.split("\n") if l]) for d in docs) == 31102  # verses


# ---------------------------------------------------------------- splits

def _reference_split(units, fractions, seed):
    "Independent reference: rank by salted sha256, cut at rounded shares (validation/test at least one)."
    n = len(units)
    rank = {i: r for r, i in enumerate(sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}\x1f{units[i]}".encode()).hexdigest()))}
    nv, nt = max(1, round(fractions[1] * n)), max(1, round(fractions[2] * n))
    return {s: [u for i, u in enumerate(units) if (rank[i] < n - nv - nt) == (s == "train")
                and (s == "train" or (rank[i] < n - nt) == (s == "validation"))] for s in SPLITS}


@pytest.mark.parametrize("n", [3, 4, 7, 20, 100, 333])
def test_split_partition_counts_and_reference(n):
    units = [f"unit {i} " + "w " * (i % 7) for i in range(n)]
    for fr, seed in [((0.9, 0.05, 0.05), 0), ((0.8, 0.1, 0.1), 5), ((0.5, 0.25, 0.25), 1)]:
        sp = split_documents(units, fr, seed)
        assert sorted(sum(sp.values(), [])) == sorted(units)                      # disjoint and complete
        assert all(len(sp[s]) >= 1 for s in SPLITS)                               # non-empty with >= 3 units
        assert sp == _reference_split(units, fr, seed)
        assert sp == split_documents(list(units), fr, seed)                       # deterministic
        rev = split_documents(units[::-1], fr, seed)
        assert {s: set(v) for s, v in rev.items()} == {s: set(v) for s, v in sp.items()}  # independent of order
        for s in SPLITS: assert sp[s] == [u for u in units if u in set(sp[s])]   # corpus order kept


def test_split_seed_duplicates_and_small():
    units = [f"u{i}" for i in range(200)]
    assert split_documents(units, seed=0)["test"] != split_documents(units, seed=1)["test"]
    dup = units + ["u7"] * 30                                                    # identical units share a split
    sp = split_documents(dup)
    assert sum(("u7" in sp[s]) for s in SPLITS) == 1
    assert [len(v) for v in split_documents(["a", "b"]).values()] == [1, 1, 0]
    assert [len(v) for v in split_documents(["a"]).values()] == [1, 0, 0]
    assert [len(v) for v in split_documents(["a", "b", "c"], (1.0, 0.0, 0.0)).values()] == [3, 0, 0]
    for bad in [(0.5, 0.5, 0.5), (0.9, 0.1), (0.0, 0.5, 0.5), (1.1, -0.05, -0.05)]:
        with pytest.raises(ValueError, match="summing to 1"): split_documents(units, bad)


def test_chunk_documents():
    doc = "\n\n".join(" ".join(["w"] * 30) for _ in range(10))        # 300 words in 10 paragraphs
    units = chunk_documents([doc, "short doc"], unit_words=100)
    assert [len(u.split()) for u in units] == [120, 120, 60, 2]    # 4 + 4 paragraphs, a 60-word tail (>= half), doc 2
    assert "\n\n".join(units[:3]) == doc                             # paragraphs never split, order kept
    doc9 = "\n\n".join(" ".join(["w"] * 30) for _ in range(9))
    assert [len(u.split()) for u in chunk_documents([doc9], 100)] == [120, 150]  # a 30-word tail joins the last unit
    assert chunk_documents(["a b", "", "c"], 0) == ["a b", "c"]


def test_shakespeare_splits_by_unit_no_leak():
    docs = load_documents("shakespeare")
    sp = {s: load_documents("shakespeare", s) for s in SPLITS}
    assert all(len(sp[s]) > 10 for s in SPLITS)
    assert not (set(sp["train"]) & set(sp["test"])) and not (set(sp["train"]) & set(sp["validation"]))
    paras = lambda texts: Counter(p for t in texts for p in t.split("\n\n"))
    assert paras(sum(sp.values(), [])) == paras(docs)               # every paragraph in exactly one split
    words = {s: sum(len(u.split()) for u in sp[s]) for s in SPLITS}
    total = sum(words.values())
    assert 0.85 < words["train"] / total < 0.95 and 0.02 < words["test"] / total < 0.08


def test_local_files_and_empty_split(tmp_path):
    texts = write_docs(tmp_path / "docs")
    assert load_documents(str(tmp_path / "docs")) == texts                           # folder
    assert load_documents(str(tmp_path / "docs" / "doc0*.txt")) == texts[:10]        # glob
    (tmp_path / "md").mkdir()
    (tmp_path / "md" / "a.md").write_text("# Title\n\nSome *text*.\n\n```\ncode\n```\n")
    assert load_documents(str(tmp_path / "md" / "a.md")) == ["Title\n\nSome text."]
    units = {s: load_documents(str(tmp_path / "docs"), s, unit_words=0) for s in SPLITS}
    assert sorted(sum(units.values(), [])) == sorted(texts)
    with pytest.raises(ValueError, match="is empty"): load_documents(str(tmp_path / "md" / "a.md"), "validation")
    with pytest.raises(ValueError, match="known corpora"): load_documents(str(tmp_path / "nothing*.txt"))


# ---------------------------------------------------------------- HF datasets (local, offline)

def test_hf_saved_dataset_dict(tmp_path):
    import datasets
    rows = {s: [f"{s} text number {i}" for i in range(4)] for s in ("train", "validation", "test")}
    datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": r + [""]}) for s, r in rows.items()}).save_to_disk(
        str(tmp_path / "dd"))
    for s in SPLITS: assert load_documents(f"hf:{tmp_path / 'dd'}", s) == rows[s]   # native splits kept
    assert load_documents(f"hf:{tmp_path / 'dd'}") == sum(rows.values(), [])


def test_hf_single_split_text_files(tmp_path):
    texts = [f"line {i} of a local text dataset" for i in range(30)]
    (tmp_path / "a.txt").write_text("\n".join(texts) + "\n\n")
    got = load_hf_documents("text", data_files={"train": str(tmp_path / "a.txt")}, split="train",
                            cache_dir=str(tmp_path / "hf"))
    assert got == texts
    import datasets
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "single"))
    sp = {s: load_documents(f"hf:{tmp_path / 'single'}", s, unit_words=0) for s in SPLITS}  # one split: hashed
    assert sorted(sum(sp.values(), [])) == sorted(texts) and all(sp.values())
    with pytest.raises(ValueError, match="no column 'content'"):
        load_hf_documents(str(tmp_path / "single"), split="train", text_field="content")


def test_hf_name_parsing_and_wikitext_grouping(monkeypatch):
    import datasets
    rows = ["", " = Alpha = \n", "", " Alpha is a letter . \n", " = = History = = \n", " Old . \n",
            " = Beta = \n", " Beta follows . \n"]
    fake = datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": rows}) for s in ("train", "validation", "test")})
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, **kw: calls.append((path, name)) or fake)
    docs = load_documents("hf:wikitext/wikitext-2-raw-v1", "test")
    assert calls == [("wikitext", "wikitext-2-raw-v1")]
    assert docs == ["= Alpha = \n\n Alpha is a letter . \n = = History = = \n Old .", "= Beta = \n Beta follows ."]
    load_documents("hf:Salesforce/wikitext:wikitext-103-raw-v1", "train")
    assert calls[-1] == ("Salesforce/wikitext", "wikitext-103-raw-v1")
    assert load_documents("wikitext-2", "validation") == docs
    assert calls[-1] == ("wikitext", "wikitext-2-raw-v1")


# ---------------------------------------------------------------- tokenization cache

@pytest.fixture(scope="module")
def bpe():
    return toy_bpe(write_docs(Path(__import__("tempfile").mkdtemp()) / "d", n=20), vocab=400)


def test_encode_documents_joins_with_eos(bpe):
    eos = eos_token_id(bpe)
    assert eos == bpe.token_to_id("<|endoftext|>")
    docs = ["the king", "a queen rides", "night"]
    ids = encode_documents(docs, bpe)
    ref = []
    for i, d in enumerate(docs): ref += ([eos] if i else []) + bpe.encode(d, add_special_tokens=False).ids
    assert ids.dtype == np.int32 and ids.tolist() == ref
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    assert encode_documents(docs, hf).tolist() == ref
    assert tokenizer_fingerprint(hf) == tokenizer_fingerprint(bpe)
    from tokenizers import Tokenizer
    no_eos = Tokenizer.from_str(bpe.to_str())
    no_eos.add_special_tokens(["<pad>"])
    assert tokenizer_fingerprint(no_eos) != tokenizer_fingerprint(bpe)


def test_token_cache_roundtrip_and_keys(tmp_path, bpe, monkeypatch):
    src = str(tmp_path / "docs")
    write_docs(tmp_path / "docs", n=12)
    a = tokenize_split(src, "train", bpe, unit_words=0)
    assert isinstance(a, np.memmap) and a.dtype == np.int32 and a.ndim == 1
    assert np.array_equal(a, encode_documents(load_documents(src, "train", unit_words=0), bpe))
    p = token_cache_path(src, "train", bpe, unit_words=0)
    assert p.exists() and verify_token_cache(p) is None
    meta = json.loads(p.with_suffix(".json").read_text())
    assert meta["n_tokens"] == len(a) and meta["sha256"] == hashlib.sha256(np.asarray(a).tobytes()).hexdigest()
    monkeypatch.setattr(D, "encode_documents", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-encoded")))
    assert np.array_equal(tokenize_split(src, "train", bpe, unit_words=0), a)           # cache hit, no encoding
    monkeypatch.undo()
    keys = {token_cache_path(src, s, bpe, unit_words=0) for s in SPLITS}
    keys |= {token_cache_path(src, "train", bpe, unit_words=0, seed=1),
             token_cache_path(src, "train", toy_bpe(["other text here"] * 5, 300), unit_words=0)}
    assert len(keys) == 5                                                                # split/seed/tokenizer in key
    assert np.array_equal(tokenize_split(src, "train", bpe, cache=False, unit_words=0), a)


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_sidecar", "bad_length", "bad_json", "other_version"])
def test_token_cache_corruption_detected_and_rebuilt(tmp_path, bpe, damage):
    src = str(tmp_path / "docs")
    write_docs(tmp_path / "docs", n=12)
    ref = np.array(tokenize_split(src, "train", bpe, unit_words=0))
    p = token_cache_path(src, "train", bpe, unit_words=0)
    meta_p = p.with_suffix(".json")
    if damage == "flip":
        with open(p, "r+b") as f: f.seek(200); b = f.read(1); f.seek(200); f.write(bytes([b[0] ^ 0xFF]))
    elif damage == "truncate":
        with open(p, "r+b") as f: f.truncate(p.stat().st_size - 8)
    elif damage == "no_sidecar": meta_p.unlink()
    elif damage == "bad_length":
        m = json.loads(meta_p.read_text()); m["n_tokens"] += 1; meta_p.write_text(json.dumps(m))
    elif damage == "bad_json": meta_p.write_text("{not json")
    elif damage == "other_version":
        m = json.loads(meta_p.read_text()); m["version"] = -1; meta_p.write_text(json.dumps(m))
    assert verify_token_cache(p) is not None
    with pytest.warns(UserWarning, match="rebuilding"):
        again = tokenize_split(src, "train", bpe, unit_words=0)
    assert np.array_equal(again, ref) and verify_token_cache(p) is None


def test_tokenize_shakespeare_validation(bpe):
    toks = tokenize_split("shakespeare", "validation", bpe)
    units = load_documents("shakespeare", "validation")
    assert int((np.asarray(toks) == eos_token_id(bpe)).sum()) == len(units) - 1
    assert bpe.decode(toks[:200].tolist()) == units[0][:len(bpe.decode(toks[:200].tolist()))]


# ---------------------------------------------------------------- batches, eval windows, calibration

TOK = np.arange(10_007, dtype=np.int32) * 3 + 1   # distinct values: a window's content identifies its start


def test_batches_shapes_and_contents():
    b = batch_at(TOK, 0, 8, 64)
    assert b.shape == (8, 64) and b.dtype == torch.int64
    for row in b:
        start = (int(row[0]) - 1) // 3
        assert start % 64 == 0 and torch.equal(row, torch.from_numpy(TOK[start:start + 64].astype(np.int64)))
    mm = np.lib.format.open_memmap(str(Path(os.environ["KDQ_BENCH_CACHE"]).parent / "t.npy"), "w+", np.int32, TOK.shape)
    mm[:] = TOK
    assert torch.equal(batch_at(mm, 5, 8, 64), batch_at(TOK, 5, 8, 64))
    assert torch.equal(batch_at(torch.from_numpy(TOK), 3, 8, 64, seed=2), batch_at(TOK, 3, 8, 64, seed=2))


def test_batches_epochs_determinism_resume():
    n = num_windows(TOK, 64)
    assert n == 10_007 // 64
    seen = torch.cat(list(batches(TOK, 7, 64, seed=4, steps=3 * n // 7 + 1)))        # > 3 epochs
    starts = ((seen[:, 0] - 1) // 3).tolist()
    for e in range(3):                                                                # every window once per epoch
        assert sorted(starts[e * n:(e + 1) * n]) == list(range(0, n * 64, 64))
    assert starts[:n] != sorted(starts[:n]) and starts[:n] != starts[n:2 * n]       # shuffled, new order each epoch
    full = list(batches(TOK, 7, 64, seed=4, steps=60))
    again = list(batches(TOK, 7, 64, seed=4, start_step=37, steps=23))
    assert all(torch.equal(x, y) for x, y in zip(full[37:], again)) and len(again) == 23
    assert all(torch.equal(batch_at(TOK, s, 7, 64, seed=4), full[s]) for s in (0, 22, 59))
    assert not torch.equal(full[0], next(batches(TOK, 7, 64, seed=5)))


def test_eval_windows_and_calibration():
    w = eval_windows(TOK, 100)
    assert torch.equal(w, torch.from_numpy(TOK[:100 * 100].reshape(100, 100).astype(np.int64)))
    assert eval_windows(TOK, 100, max_windows=7).shape == (7, 100)
    assert [x.shape[0] for x in eval_batches(TOK, 32, 100)] == [32, 32, 32, 4]
    c = calibration_set(TOK, 16, 128, seed=3)
    assert c.shape == (16, 128) and torch.equal(c, calibration_set(TOK, 16, 128, seed=3))
    assert not torch.equal(c, calibration_set(TOK, 16, 128, seed=4))
    starts = ((c[:, 0] - 1) // 3).tolist()
    assert len(set(starts)) == 16
    for s, row in zip(starts, c): assert torch.equal(row, torch.from_numpy(TOK[s:s + 128].astype(np.int64)))
    small = calibration_set(TOK[:130], 10, 128, seed=0)                              # 3 possible starts: repeats
    assert small.shape == (10, 128)


def test_window_errors():
    with pytest.raises(ValueError, match="only 50 tokens"): batch_at(TOK[:50], 0, 2, 64)
    with pytest.raises(ValueError, match="only 50 tokens"): calibration_set(TOK[:50], 2, 64)
    with pytest.raises(ValueError, match="only 0 tokens"): eval_windows(TOK[:0], 8)
    with pytest.raises(ValueError, match="1-D"): batch_at(TOK.reshape(1, -1), 0, 2, 8)
    with pytest.raises(ValueError, match="n_samples"): calibration_set(TOK, 0, 8)


def test_check_corpus_refuses_what_cannot_load(monkeypatch):
    "Unknown names, paths matching nothing and corpora not installed are ValueErrors (CorpusUnavailable is one), before any reading."
    from kdq_bench.data import check_corpus, CorpusUnavailable, CORPORA
    assert check_corpus('shakespeare') == 'shakespeare' and issubclass(CorpusUnavailable, ValueError)
    for bad in ('klingon', '/no/such/dir/*.txt', ''):
        with pytest.raises(ValueError): check_corpus(bad)
    import datasets
    monkeypatch.setattr(datasets.config, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(datasets, 'load_dataset_builder', lambda *a, **k: (_ for _ in ()).throw(ConnectionError('offline')))
    assert not CORPORA['wikitext-2'].available()          # offline and not in the local cache: not installed
    with pytest.raises(ValueError, match='not installed'): check_corpus('wikitext-2')
