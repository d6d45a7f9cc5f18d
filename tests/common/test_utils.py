"""write_atomic: readers see the old file or the new one, and a failed write leaves nothing behind."""
from __future__ import annotations

import pytest

from minigpt4.common.utils import write_atomic


def test_write_atomic_replaces_the_file(tmp_path):
    path = tmp_path / "checkpoint.pth"
    path.write_text("old")
    assert write_atomic(path, lambda tmp: tmp.write_text("new")) == path
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_partial_one(tmp_path):
    path = tmp_path / "checkpoint.pth"
    path.write_text("old")

    def disk_full(tmp):
        tmp.write_text("half of a checkpo")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, disk_full)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]
