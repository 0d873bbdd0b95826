"""Atomic writes (temporary name, then rename) leave files and folders with the permissions a plain write would give
them: tempfile makes its files and folders private to the user, and a rename keeps that, so results and
checkpoints written on a shared machine would be unreadable to everyone else."""
from __future__ import annotations

import os
import stat

import pytest

from rss_jax.loading.orbax_io import atomic_folder
from rss_jax.report import write_json


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o022
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_json_has_the_umask_mode(tmp_path, umask_022):
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    out = write_json(str(tmp_path / "out.json"), {"a": 1})
    assert mode(out) == mode(plain) == 0o644
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_write_json_follows_a_stricter_umask(tmp_path):
    old = os.umask(0o077)
    try:
        out = write_json(str(tmp_path / "out.json"), [1, 2])
    finally:
        os.umask(old)
    assert mode(out) == 0o600


def test_atomic_folder_is_not_private(tmp_path, umask_022):
    target = tmp_path / "ckpt"
    with atomic_folder(str(target)) as tmp:
        with open(os.path.join(tmp, "weights.bin"), "wb") as f:
            f.write(b"x")
    assert mode(target) == 0o755
    assert mode(target / "weights.bin") == 0o644


def test_current_umask_reads_without_changing_it(monkeypatch):
    """Read from /proc where Linux has it, else set and restored: both give the umask and leave it as it was."""
    import builtins

    from rss_jax.report import current_umask
    old = os.umask(0o027)
    real_umask = os.umask
    try:
        def no_umask(mask):
            raise AssertionError("the /proc path should not set the umask")
        monkeypatch.setattr(os, "umask", no_umask)
        assert current_umask() == 0o027  # read from /proc/self/status
        monkeypatch.setattr(os, "umask", real_umask)
        real_open = builtins.open

        def no_proc(path, *a, **k):
            if str(path).startswith("/proc"):
                raise OSError("no /proc here")
            return real_open(path, *a, **k)
        monkeypatch.setattr(builtins, "open", no_proc)
        assert current_umask() == 0o027  # set and restored
        assert os.umask(0o027) == 0o027  # unchanged by either path
    finally:
        os.umask(old)
