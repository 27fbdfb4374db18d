"""The suite needs nothing beside the repository: the guard in conftest flags any file a test opens
outside the repository, the temp dir and the Python installation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import conftest
from conftest import REPO, outside_the_allowed_roots

# a folder that is neither the repository, the temp dir nor the Python installation, wherever the
# clone lives (a clone inside the temp dir has its siblings in the temp dir)
OUTSIDE = Path("/twotower-guard-probe-not-there")


def test_paths_outside_the_repository_are_flagged(tmp_path):
    assert outside_the_allowed_roots(OUTSIDE / "corpus" / "a.txt")
    if not outside_the_allowed_roots(REPO.parent / "x"):  # the clone's parent is an allowed root
        assert not outside_the_allowed_roots(tmp_path)
    else:
        assert outside_the_allowed_roots(REPO.parent / "shared" / "corpus" / "a.txt")
    assert not outside_the_allowed_roots(REPO / "tests" / "data" / "stories.txt")
    assert not outside_the_allowed_roots(tmp_path / "x.txt")
    assert not outside_the_allowed_roots(os.__file__)


def test_the_guard_records_an_open_outside(tmp_path):
    """An attempted read of a sibling folder is recorded even when the file does not exist (the
    autouse fixture would then fail the test; here the record is checked and cleared)."""
    missing = OUTSIDE / "corpus.txt"
    try:
        open(missing).close()
    except OSError:
        pass
    assert str(missing) in conftest._outside
    conftest._outside.clear()


def test_a_test_that_reads_outside_fails(tmp_path):
    """Run pytest on a test that reads a path beside the repository: it must fail with the guard's
    message."""
    test = REPO / "tests" / f"test_guard_probe_{os.getpid()}.py"
    test.write_text(f"def test_probe():\n    try:\n        open('{OUTSIDE}/corpus/x.txt')\n"
                    "    except OSError:\n        pass\n")
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
                                cwd=REPO, capture_output=True, text=True, timeout=120,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        test.unlink()
    assert result.returncode == 1, result.stdout[-2000:]
    assert "read outside the repository" in result.stdout
