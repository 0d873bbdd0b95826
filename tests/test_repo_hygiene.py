"""The repository stands on its own: no tracked file may point at documents the repository does not hold.

The maths lives in docs/algorithms.md (cited as `docs/algorithms.md §2.3`). A tracked file must not mention the
team's external reference documents by file name, a path into the sibling `shared` folder, or the old citation
style: the upper-case word for the old reference followed by a section number. Fast and free of jax: it only reads
the files `git ls-files` lists, and it is skipped where git or the repository's history is unavailable (e.g. an
installed sdist).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Binary or data formats that cannot hold a citation; any other file holding a NUL byte is skipped too.
BINARY_SUFFIXES = (".safetensors", ".png", ".jpg", ".jpeg", ".gif", ".ico", ".pdf", ".gguf", ".npz", ".npy", ".bin",
                   ".pt", ".pth", ".pkl", ".zip", ".gz", ".tar", ".whl", ".parquet", ".arrow")

# The patterns are written so that this file's own text matches none of them.
FORBIDDEN = [
    ("a path into the external shared folder", re.compile(r"\.\./shared\b")),
    ("an absolute path to the external shared folder", re.compile(re.escape("/work" + "/shared"))),
    ("the external spec document", re.compile(r"\bSPEC\.md\b", re.IGNORECASE)),
    ("the external design document", re.compile(r"\bDESIGN\.md\b", re.IGNORECASE)),
    ("an old-style section citation", re.compile(r"\bSPEC(?:[ _]?(?:sections?\s+|§\s*)?)\d")),
]


def tracked_files() -> list[str]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    try:
        res = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"git ls-files failed: {e}")
    if res.returncode != 0:
        pytest.skip("not a git checkout: " + res.stderr.decode(errors="replace").strip())
    return [p for p in res.stdout.decode("utf-8", errors="surrogateescape").split("\0") if p]


def scan(rel: str) -> list[str]:
    """-> one 'path:line: what (text)' entry per offending line of the tracked file `rel`."""
    if rel.lower().endswith(BINARY_SUFFIXES):
        return []
    path = os.path.join(ROOT, rel)
    if not os.path.isfile(path):  # deleted in the working tree, or a submodule
        return []
    with open(path, "rb") as f:
        data = f.read()
    if b"\0" in data[:8192]:
        return []
    found = []
    for no, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        for what, pattern in FORBIDDEN:
            if pattern.search(line):
                found.append(f"{rel}:{no}: {what}: {line.strip()[:160]}")
    return found


def test_patterns_catch_the_old_forms():
    """The check itself: each old form is caught, the new citation style and unrelated words are not."""
    bad = ["see ../" + "shared/x", "(" + "SPEC" + " 2.4)", "SPEC" + "_22 = {", "SPEC" + ".md section 8",
           "spec" + ".md", "DESIGN" + ".md", "SPEC" + " section 3"]
    good = ["docs/algorithms.md §2.4", 'metavar="SPEC"', "spec = importlib.util.find_spec(module)",
            "a spec string such as 0-3", "HeadTrainSpec(graphdef)"]
    for text in bad:
        assert any(p.search(text) for _, p in FORBIDDEN), text
    for text in good:
        assert not any(p.search(text) for _, p in FORBIDDEN), text


def test_no_tracked_file_refers_to_external_documents():
    files = tracked_files()
    assert files, "git ls-files listed nothing"
    found = [entry for rel in files for entry in scan(rel)]
    assert not found, ("tracked files refer to documents outside the repository (cite docs/algorithms.md "
                       "instead):\n" + "\n".join(found))
