"""Fault cases of kdq_bench.files: full and read-only disks, folder ownership, checksums."""
import errno, json, os, shutil, subprocess, sys, warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from kdq_bench import files as F
from kdq_bench.files import (MANIFEST, MARKER, WriteError, atomic_dir, atomic_file, atomic_write_bytes, atomic_write_json,
                             atomic_write_text, check_folder, claim_folder, record, remove_owned, verify_manifest,
                             write_manifest)
from faults import can_mount, full_disk, leftovers, read_only

DISK_FULL = (errno.ENOSPC, errno.EFBIG)      # a real full tmpfs, or a file-size limit without root
NOT_WRITABLE = (errno.EROFS, errno.EACCES)   # a read-only tmpfs, or chmod 0o555 without root


def one_line(e):
    s = str(e)
    assert "\n" not in s and s.startswith("cannot write "), s
    return s


# ---------------------------------------------------------------- atomic files
def test_atomic_writers_roundtrip_and_replace(tmp_path):
    p = tmp_path / "a" / "b.json"
    assert atomic_write_json(p, {"x": 1}) == p and json.loads(p.read_text()) == {"x": 1}
    atomic_write_text(p, '{"x": 2}')
    assert json.loads(p.read_text()) == {"x": 2}
    atomic_write_bytes(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert leftovers(tmp_path) == []
    assert oct(p.stat().st_mode & 0o777) == oct(0o666 & ~_umask())       # ordinary permissions, not mkstemp's 0600


def _umask():
    m = os.umask(0); os.umask(m); return m


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_file_failure_keeps_old_and_cleans(tmp_path, exc):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"old")
    with pytest.raises(exc):
        with atomic_file(p) as tmp:
            tmp.write_bytes(b"new but incomplete"); raise exc("stop")
    assert p.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_full_disk_atomic_writers(tmp_path):
    with full_disk(tmp_path) as d:
        atomic_write_bytes(d / "small.bin", b"ok")
        for write in (lambda: atomic_write_bytes(d / "small.bin", bytes(1_000_000)),
                      lambda: atomic_write_text(d / "small.bin", "x" * 1_000_000),
                      lambda: atomic_write_json(d / "small.bin", ["x" * 1_000_000])):
            with pytest.raises(WriteError) as e: write()
            assert e.value.errno in DISK_FULL and e.value.filename == str(d / "small.bin")
            assert one_line(e.value).startswith(f"cannot write {d / 'small.bin'}: ")
            assert isinstance(e.value, OSError) and isinstance(e.value.__cause__, OSError)
            assert (d / "small.bin").read_bytes() == b"ok" and leftovers(d) == []


def test_full_disk_library_writers(tmp_path):
    "safetensors and torch.save do not raise OSError on a full disk; the error is still a WriteError naming the path."
    from safetensors.torch import save_file
    big = {"w": torch.zeros(200_000)}
    with full_disk(tmp_path) as d:
        writers = [("w.safetensors", lambda t: save_file(big, str(t))), ("w.npy", lambda t: np.save(open(t, "wb"), np.zeros(200_000)))]
        if can_mount():   # torch.save's RuntimeError names no cause: recognised by the full file system, not by a size limit
            writers.append(("w.pt", lambda t: torch.save(big, t)))
        for name, save in writers:
            with pytest.raises(WriteError) as e:
                with atomic_file(d / name) as t: save(t)
            # NumPy reports a short write without an errno; a full file system is recognised as such, a size limit is not
            assert e.value.errno in (DISK_FULL if can_mount() else DISK_FULL + (None,))
            assert one_line(e.value).startswith(f"cannot write {d / name}: ")
            assert leftovers(d) == [] and not (d / name).exists()


def test_full_disk_atomic_dir_keeps_previous(tmp_path):
    with full_disk(tmp_path) as d:
        with atomic_dir(d / "ckpt", "checkpoint") as t: (t / "weights.bin").write_bytes(b"step 1")
        with pytest.raises(WriteError) as e:
            with atomic_dir(d / "ckpt", "checkpoint") as t:
                (t / "config.json").write_text("{}")
                with open(t / "weights.bin", "wb") as f: f.write(bytes(1_000_000))
        assert e.value.errno in DISK_FULL
        assert one_line(e.value).startswith(f"cannot write {d / 'ckpt'}")             # (a file object's write names no file)
        assert (d / "ckpt" / "weights.bin").read_bytes() == b"step 1"       # the previous checkpoint is whole
        assert sorted(p.name for p in d.iterdir()) == ["ckpt"] and leftovers(d) == []


def test_full_disk_safetensors_in_atomic_dir(tmp_path):
    from safetensors.torch import save_file
    with full_disk(tmp_path) as d:
        with pytest.raises(WriteError) as e:
            with atomic_dir(d / "model", "teacher") as t: save_file({"w": torch.zeros(200_000)}, str(t / "model.safetensors"))
        assert e.value.errno in DISK_FULL and str(d / "model") in one_line(e.value)
        assert list(d.iterdir()) == []


def test_read_only_folder(tmp_path):
    def fill(w):
        (w / "old.json").write_text('{"v": 1}')
        with atomic_dir(w / "ckpt", "checkpoint") as t: (t / "a.bin").write_bytes(b"a")
    with read_only(tmp_path, fill) as d:
        for path, write in ((d / "old.json", lambda: atomic_write_json(d / "old.json", {"v": 2})),
                            (d / "new" / "x.txt", lambda: atomic_write_text(d / "new" / "x.txt", "x"))):
            with pytest.raises(WriteError) as e: write()
            assert e.value.errno in NOT_WRITABLE
            assert one_line(e.value).startswith(f"cannot write {path}: ")
        with pytest.raises(WriteError) as e:
            with atomic_dir(d / "ckpt", "checkpoint") as t: (t / "a.bin").write_bytes(b"b")
        assert e.value.errno in NOT_WRITABLE and str(d / "ckpt") in one_line(e.value)
        with pytest.raises(WriteError) as e: claim_folder(d / "run", "study")
        assert e.value.errno in NOT_WRITABLE and str(d / "run") in one_line(e.value)
        assert json.loads((d / "old.json").read_text()) == {"v": 1} and (d / "ckpt" / "a.bin").read_bytes() == b"a"
        assert leftovers(d) == []
        assert sorted(p.name for p in d.iterdir()) == ["ckpt", "old.json"]


def test_write_error_is_not_raised_for_bugs(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with atomic_file(tmp_path / "x") as t: t.write_text("1"); 1 / 0
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "y.json", {"f": object()})
    assert leftovers(tmp_path) == [] and not (tmp_path / "x").exists()


# ---------------------------------------------------------------- ownership
def test_claim_refusals_before_any_work(tmp_path, monkeypatch):
    cases = {"/": "file-system root", str(Path.home()): "home folder", "~": "home folder"}
    user = tmp_path / "user"; (user / "data").mkdir(parents=True); (user / "notes.txt").write_text("mine")
    (user / ".git").mkdir(); (user / ".git" / "HEAD").write_text("ref")
    cases[str(user)] = "not created by kdq_bench"
    cases[str(user / "notes.txt")] = "is a file"
    cases[str(user / "notes.txt" / "run")] = cases[str(user / "notes.txt" / "a" / "b")] = "is a file, so no folder"  # under a file
    only_git = tmp_path / "repo"; (only_git / ".git").mkdir(parents=True)
    cases[str(only_git)] = "not created by kdq_bench"                                     # hidden files count
    other = claim_folder(tmp_path / "other", "train-run")
    cases[str(other)] = "holds a kdq_bench 'train-run'"
    bad = tmp_path / "bad"; bad.mkdir(); (bad / MARKER).write_text("{nope")
    cases[str(bad)] = "marker .kdq_bench.json is unreadable"
    odd = tmp_path / "odd"; odd.mkdir(); (odd / MARKER).write_text('{"kind": "study", "files": "notes.txt"}')
    cases[str(odd)] = "marker .kdq_bench.json is unreadable"
    here = tmp_path / "work" / "sub"; here.mkdir(parents=True); monkeypatch.chdir(here)
    cases[str(here)] = cases["."] = cases[str(tmp_path / "work")] = "current working directory"
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for path, why in cases.items():
        for f in (check_folder, claim_folder):
            with pytest.raises(ValueError, match=why) as e: f(path, "study")
            assert "\n" not in str(e.value) and "refusing" in str(e.value) or "unreadable" in str(e.value)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before                          # nothing created or marked
    with pytest.raises(ValueError, match="kind"): claim_folder(tmp_path / "x", "")


def test_claim_accepts_new_empty_and_own(tmp_path):
    a = claim_folder(tmp_path / "new" / "deep", "study")
    assert json.loads((a / MARKER).read_text())["created_folder"] is True
    e = tmp_path / "empty"; e.mkdir()
    assert json.loads((claim_folder(e, "study") / MARKER).read_text())["created_folder"] is False
    atomic_write_text(a / "m.json", "{}"); record(a, "m.json")
    assert claim_folder(a, "study") == a and json.loads((a / MARKER).read_text())["files"] == ["m.json"]  # kept


def test_remove_owned_removes_only_kdq_files(tmp_path, monkeypatch):
    run = claim_folder(tmp_path / "run", "study")
    for rel in ("metrics.json", "report/index.html", "ckpt/step-1/w.bin", "ckpt/step-1/opt.bin"):
        (run / rel).parent.mkdir(parents=True, exist_ok=True); atomic_write_text(run / rel, rel)
    record(run, "metrics.json", "report", run / "ckpt")
    # the user's things, next to and inside kdq_bench's folders, and a file that replaced a recorded one by a folder
    user = {"notes.txt": "n", "data/a.csv": "1", ".git/HEAD": "h", "report/my-notes.md": "m", "ckpt/KEEP": "k"}
    for rel, text in user.items(): (run / rel).parent.mkdir(parents=True, exist_ok=True); (run / rel).write_text(text)
    outside = tmp_path / "outside.txt"; outside.write_text("precious")
    (run / "link").symlink_to(outside); record(run, "link")
    m = json.loads((run / MARKER).read_text())                      # a tampered marker pointing outside the folder
    m["files"] += ["../outside.txt", str(outside), ".."]; (run / MARKER).write_text(json.dumps(m))
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: pytest.fail("remove_owned must not call rmtree"))
    remove_owned(run)
    left = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    assert left == [".git", ".git/HEAD", "ckpt", "ckpt/KEEP", "data", "data/a.csv", "notes.txt", "report", "report/my-notes.md"]
    assert all((run / rel).read_text() == text for rel, text in user.items())
    assert outside.read_text() == "precious"
    with pytest.raises(ValueError, match="deletes nothing"): remove_owned(run)
    with pytest.raises(ValueError, match="deletes nothing"): remove_owned(tmp_path)


def test_remove_owned_folder_lifecycle(tmp_path):
    mine = claim_folder(tmp_path / "mine", "study"); atomic_write_text(mine / "a", "a"); record(mine, "a")
    remove_owned(mine)
    assert not mine.exists()                                        # kdq_bench made it and only its files were there
    theirs = tmp_path / "theirs"; theirs.mkdir()
    claim_folder(theirs, "study"); atomic_write_text(theirs / "a", "a"); record(theirs, "a")
    remove_owned(theirs)
    assert theirs.is_dir() and list(theirs.iterdir()) == []         # existed before: kept, empty


def test_remove_owned_empties_nested_kdq_folders_by_their_own_record(tmp_path):
    "A study's run folder, recorded when it started, holds checkpoints only its own marker lists (an interrupted run)."
    study = claim_folder(tmp_path / "study", "study")
    (study / "runs" / "kd").mkdir(parents=True); record(study, study / "runs")
    run = claim_folder(study / "runs" / "kd", "train-run")            # the trainer claims the folder the study recorded
    ck = claim_folder(run / "checkpoint-4", "checkpoint"); atomic_write_text(ck / "w.bin", "w"); record(ck, "w.bin")
    atomic_write_text(run / "metrics.jsonl", "{}"); record(run, "metrics.jsonl", ck)
    (run / "my-notes.md").write_text("mine")                          # the user's file inside kdq_bench's run
    remove_owned(study, keep_folder=True)
    left = sorted(p.relative_to(study).as_posix() for p in study.rglob("*"))
    assert left == [MARKER, "runs", "runs/kd", "runs/kd/my-notes.md"]
    assert json.loads((study / MARKER).read_text())["files"] == []
    with pytest.raises(ValueError, match="not empty"): claim_folder(study / "runs" / "kd", "train-run")   # no marker left: the user's


def test_record_refuses_outside_and_is_concurrency_safe(tmp_path):
    run = claim_folder(tmp_path / "run", "study")
    for p in (tmp_path / "x", "../x", run / MARKER, run):
        with pytest.raises(ValueError): record(run, p)
    code = ("import sys; from pathlib import Path; from kdq_bench.files import record, atomic_write_text\n"
            "run, k = Path(sys.argv[1]), sys.argv[2]\n"
            "for i in range(15): atomic_write_text(run / f'{k}-{i}', 'x'); record(run, f'{k}-{i}')\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(run), k]) for k in "abcd"]
    assert [p.wait() for p in procs] == [0] * 4
    assert len(json.loads((run / MARKER).read_text())["files"]) == 60   # no entry lost to a concurrent update


def test_atomic_dir_never_deletes_the_previous_copy_when_cleanup_fails(tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    with atomic_dir(ck, "checkpoint") as t: (t / "w.bin").write_bytes(b"1")
    (ck / "notes.txt").write_text("the user's")
    monkeypatch.setattr(F, "remove_owned", lambda f: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.warns(UserWarning, match="could not be removed"):
        with atomic_dir(ck, "checkpoint") as t: (t / "w.bin").write_bytes(b"2")
    assert (ck / "w.bin").read_bytes() == b"2"
    old = [p for p in tmp_path.iterdir() if p != ck]
    assert len(old) == 1 and (old[0] / "notes.txt").read_text() == "the user's"   # the previous copy is left, not deleted


@pytest.mark.parametrize("exchange", [True, False])   # the atomic swap (Linux), and the two-rename fallback
def test_atomic_dir_refuses_unowned_and_keeps_user_files(tmp_path, monkeypatch, exchange):
    if not exchange: monkeypatch.setattr(F, "_exchange", lambda a, b: False)
    user = tmp_path / "user"; user.mkdir(); (user / "notes.txt").write_text("mine")
    ran = []
    with pytest.raises(ValueError, match="not created by kdq_bench"):
        with atomic_dir(user, "checkpoint"): ran.append(1)
    assert ran == [] and (user / "notes.txt").read_text() == "mine"
    ck = tmp_path / "ck"
    with atomic_dir(ck, "checkpoint") as t: (t / "w.bin").write_bytes(b"1")
    (ck / "my-notes.txt").write_text("added by the user")
    with pytest.warns(UserWarning, match="were kept in"):
        with atomic_dir(ck, "checkpoint") as t: (t / "w.bin").write_bytes(b"2")
    assert (ck / "w.bin").read_bytes() == b"2" and not (ck / "my-notes.txt").exists()
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("ck.replaced-")]
    assert len(kept) == 1 and [p.name for p in kept[0].iterdir()] == ["my-notes.txt"]
    with atomic_dir(ck, "checkpoint", replace=False) as t: (t / "w.bin").write_bytes(b"3")
    assert (ck / "w.bin").read_bytes() == b"2" and leftovers(tmp_path) == []          # replace=False: the existing wins
    with pytest.raises(ValueError, match="holds a kdq_bench 'checkpoint'"):
        with atomic_dir(ck, "teacher"): pass


def test_atomic_dir_nested_in_claimed_folder(tmp_path):
    run = claim_folder(tmp_path / "run", "train-run")
    with atomic_dir(run / "checkpoints" / "step-2", "checkpoint") as t: (t / "w.bin").write_bytes(b"w")
    record(run, "checkpoints")
    (run / "notes.txt").write_text("mine")
    remove_owned(run)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]   # the nested checkpoint and its marker are gone


# ---------------------------------------------------------------- checksums
def test_manifest_detects_every_single_byte_flip(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "sub").mkdir()
    blobs = {"w.bin": rng.bytes(3000), "sub/o.bin": rng.bytes(17), "e.bin": b""}
    for k, v in blobs.items(): (tmp_path / k).write_bytes(v)
    (tmp_path / "extra.txt").write_text("not listed")
    write_manifest(tmp_path, ["w.bin", tmp_path / "sub" / "o.bin", "e.bin"])
    assert verify_manifest(tmp_path) == []
    assert sorted(json.loads((tmp_path / MANIFEST).read_text())["files"]) == ["e.bin", "sub/o.bin", "w.bin"]
    p = tmp_path / "w.bin"
    for pos in rng.choice(3000, 25, replace=False).tolist() + [0, 2999]:
        for bit in (0, 7):
            b = bytearray(blobs["w.bin"]); b[pos] ^= 1 << bit; p.write_bytes(bytes(b))
            assert verify_manifest(tmp_path) == ["changed: w.bin (SHA-256 differs)"]
    p.write_bytes(blobs["w.bin"][:-1]); assert verify_manifest(tmp_path) == ["truncated: w.bin (2,999 of 3,000 bytes)"]
    p.write_bytes(b""); assert verify_manifest(tmp_path) == ["truncated: w.bin (0 of 3,000 bytes)"]
    p.unlink(); (tmp_path / "sub" / "o.bin").write_bytes(blobs["sub/o.bin"] + b"\0")
    assert verify_manifest(tmp_path) == ["grown: sub/o.bin (18 bytes, expected 17)", "missing: w.bin"]
    (tmp_path / MANIFEST).unlink(); assert verify_manifest(tmp_path) == [f"{tmp_path / MANIFEST} is missing"]
    (tmp_path / MANIFEST).write_text('{"files": 3}'); assert "unreadable" in verify_manifest(tmp_path)[0]


def test_manifest_defaults_and_refusals(tmp_path):
    with atomic_dir(tmp_path / "art", "artifact") as t:
        (t / "a").write_text("a"); (t / "b").mkdir(); (t / "b" / "c").write_text("c"); write_manifest(t)
    art = tmp_path / "art"
    assert sorted(json.loads((art / MANIFEST).read_text())["files"]) == ["a", "b/c"]   # marker and manifest left out
    assert verify_manifest(art) == []
    with pytest.raises(ValueError, match="not inside"): write_manifest(art, [tmp_path / "elsewhere"])
    with pytest.raises(ValueError, match="not a file"): write_manifest(art, ["missing"])
