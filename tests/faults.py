"""Real disk faults for tests: a full file system and a read-only one.

As root (CI and this machine run the tests as root) both are small `tmpfs` mounts made by the test and removed after
it: the kernel itself answers ENOSPC and EROFS. Without root, a full disk is a file-size limit (RLIMIT_FSIZE, the
kernel answers EFBIG) and a read-only folder is `chmod 0o555` (EACCES), which root would ignore.
"""
import contextlib, os, resource, signal, subprocess
from pathlib import Path

import pytest


def can_mount() -> bool:
    return os.geteuid() == 0


def _mount(where: Path, size: str):
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode: pytest.fail(f"running as root but cannot mount a tmpfs for a fault test: {r.stderr.strip()}")


def _umount(where: Path):
    subprocess.run(["umount", "-l", str(where)], check=True)


@contextlib.contextmanager
def full_disk(base: Path, size_kib: int = 64):
    """A folder where writing more than about `size_kib` KiB fails as on a full disk.

    Root: a real tmpfs of that size (ENOSPC). Otherwise: the process's file-size limit lowered to that size (EFBIG)."""
    where = base / "full"
    if can_mount():
        _mount(where, f"{size_kib}k")
        try: yield where
        finally: _umount(where)
    else:
        where.mkdir(parents=True, exist_ok=True)
        old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        old = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size_kib * 1024, old[1]))
        try: yield where
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old); signal.signal(signal.SIGXFSZ, old_sig)


@contextlib.contextmanager
def read_only(base: Path, fill=None):
    """A read-only folder; `fill(folder)` writes its content first (while it is still writable).

    Root: a tmpfs remounted read-only (EROFS). Otherwise: the folder and its subfolders chmod 0o555 (EACCES)."""
    where = base / "ro"
    if can_mount():
        _mount(where, "4m")
        try:
            if fill: fill(where)
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
            yield where
        finally: _umount(where)
    else:
        where.mkdir(parents=True, exist_ok=True)
        if fill: fill(where)
        dirs = [where] + [p for p in where.rglob("*") if p.is_dir()]
        for d in dirs: d.chmod(0o555)
        try: yield where
        finally:
            for d in dirs: d.chmod(0o755)


def leftovers(folder: Path) -> list:
    "Temporary files or folders kdq_bench's atomic writers left under `folder` (should be none)."
    return sorted(str(p) for p in Path(folder).rglob("*") if p.name.endswith((".tmp", ".old")) or ".tmp." in p.name)
