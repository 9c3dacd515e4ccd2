"""Atomic writes: the final file only, with the permissions the user's umask gives."""

from __future__ import annotations

import os
import stat

import pytest

from hmqsearch.io import atomic_write, write_json


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    """Not the temporary file's owner-only 0600: on a shared machine 0022 makes results readable."""
    old = os.umask(umask)
    try:
        written = [write_json(tmp_path / "summary.json", {"a": 1}),
                   atomic_write(tmp_path / "model.onnx", lambda p: p.write_bytes(b"graph"))]
    finally:
        os.umask(old)
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "summary.json"]  # no temporary left
