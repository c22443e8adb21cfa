"""The embedded teacher shipped inside the package: present, intact, the default recipe's, loaded without training,
as good as its record, carried by a wheel; and the first-use notices of teachers that must be built."""
import json, math, shutil, subprocess, sys, zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kdq_bench import models
from kdq_bench.data import eval_windows, tokenize_split
from kdq_bench.files import MANIFEST, verify_manifest
from kdq_bench.models import (DEFAULT_RECIPE, EMBEDDED_ASSET, SHIP_DTYPE, embedded_teacher, load_teacher, shipped_teacher,
                              teacher_dir, teacher_first_use)
from kdq_bench.testing import TINY_RECIPE, cache_at

ROOT = Path(__file__).resolve().parents[1]


def no_training(*a, **k): raise AssertionError("the shipped teacher must load without training")


def test_shipped_teacher_is_the_default_recipes_and_intact():
    assert shipped_teacher(DEFAULT_RECIPE) == EMBEDDED_ASSET
    assert shipped_teacher(TINY_RECIPE) is None and shipped_teacher(replace(DEFAULT_RECIPE, seed=1)) is None
    assert verify_manifest(EMBEDDED_ASSET) == []
    listed = set(json.loads((EMBEDDED_ASSET / MANIFEST).read_text())["files"])
    assert {"model.safetensors", "config.json", "tokenizer.json", "teacher.json"} <= listed
    from safetensors import safe_open
    with safe_open(str(EMBEDDED_ASSET / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {{torch.bfloat16: "BF16", torch.float16: "F16"}[SHIP_DTYPE]}


def test_shipped_teacher_loads_without_training_and_matches_its_record(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "train_teacher", no_training)
    with cache_at(tmp_path):
        assert teacher_first_use("embedded") is None
        t = load_teacher("embedded")
        assert t.path == EMBEDDED_ASSET and not (tmp_path / "teachers").exists()     # nothing trained or written
        assert t.n_params == t.info["n_params"] == 2_557_632 and t.vocab_size == DEFAULT_RECIPE.vocab_size
        assert next(t.model.parameters()).dtype == torch.float32 and models.is_frozen(t.model)
        r = DEFAULT_RECIPE
        val = eval_windows(tokenize_split(r.corpus, "validation", t.tokenizer), r.seq_len, max_windows=r.eval_tokens // r.seq_len)
        vl = models._val_loss(t.model, val, r.batch_size * 2)
        assert abs(vl - t.info["shipped_val_loss"]) < 1e-4    # the recorded figure, recomputed (to float summation order)
        assert abs(vl - t.info["val_loss"]) < 0.002                               # 16-bit storage costs < 0.2% perplexity
        assert math.exp(vl) < 55


def test_damaged_shipped_teacher_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "asset"
    shutil.copytree(EMBEDDED_ASSET, copy)
    b = bytearray((copy / "model.safetensors").read_bytes()); b[-1000] ^= 0x10; (copy / "model.safetensors").write_bytes(bytes(b))
    monkeypatch.setattr(models, "EMBEDDED_ASSET", copy)
    monkeypatch.setattr(models, "train_teacher", no_training)
    with cache_at(tmp_path / "cache"), pytest.raises(ValueError, match="damaged.*changed: model.safetensors.*reinstall"):
        embedded_teacher()


def test_first_use_notices(tmp_path, capsys):
    r = replace(TINY_RECIPE, seed=123)                 # a recipe nobody trained: it trains, and says so first
    with cache_at(tmp_path):
        msg = teacher_first_use("embedded", r)
        assert msg.startswith(f"kdq_bench: training the embedded teacher (recipe {r.key()}) on first use: at most ")
        assert f"{r.max_steps:,} steps of" in msg and str(teacher_dir("embedded", r)) in msg and "\n" not in msg
        assert "converting SmolLM2-135M" in teacher_first_use("smollm2-135m") and "about 30 s" in teacher_first_use("smollm2-135m")
        assert teacher_first_use(str(tmp_path)) is None
        capsys.readouterr()
        embedded_teacher(r, progress=False)
        err = capsys.readouterr().err
        assert f"kdq_bench: training the embedded teacher (recipe {r.key()}) on first use: " in err
        assert teacher_first_use("embedded", r) is None                         # cached now
    rng_before = torch.get_rng_state()
    models.step_seconds(TINY_RECIPE)
    assert torch.equal(torch.get_rng_state(), rng_before)                      # timing leaves the seeded RNG alone


def test_wheel_carries_the_shipped_teacher(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    whl = next(tmp_path.glob("kdq_bench-*.whl"))
    names = set(zipfile.ZipFile(whl).namelist())
    for f in list(json.loads((EMBEDDED_ASSET / MANIFEST).read_text())["files"]) + [MANIFEST]:
        assert f"kdq_bench/assets/embedded_teacher/{f}" in names, f
