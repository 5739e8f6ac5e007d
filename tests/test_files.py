"""Files written whole: a completed write replaces the file; a write that fails leaves the old file and no
temporary one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sentiment.files import atomic_path, write_atomic


def test_a_completed_write_replaces_the_file_and_leaves_nothing_beside(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text("old")
    write_atomic(path, "new")
    assert path.read_text() == "new"
    with atomic_path(tmp_path / "logits.npz") as tmp:  # the suffix stays: numpy writes exactly that name
        assert tmp.suffix == ".npz" and tmp.parent == tmp_path and tmp.name.startswith(".")
        np.savez(tmp, logits=np.arange(3))
    assert np.load(tmp_path / "logits.npz")["logits"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logits.npz", "metrics.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_partial_one(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    path.write_text("complete")
    with pytest.raises(OSError, match="disk full"), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise OSError("disk full")
    assert path.read_text() == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]
