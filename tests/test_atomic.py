"""write_atomic: all or nothing, never through a planted symlink, one-line errors."""
from __future__ import annotations

import errno
from pathlib import Path

import pytest

from torchdam import atomic
from torchdam.atomic import write_atomic
from torchdam.errors import CheckpointError, DiskFullError


def test_writes_bytes_text_and_writer_callables(tmp_path: Path) -> None:
    write_atomic(tmp_path / "a.bin", b"\x00\x01")
    write_atomic(tmp_path / "sub" / "b.txt", "héllo")
    write_atomic(tmp_path / "c.txt", lambda tmp: tmp.write_text("from a writer"))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "sub" / "b.txt").read_text() == "héllo"
    assert (tmp_path / "c.txt").read_text() == "from a writer"
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_planted_symlink_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").symlink_to(victim)
    write_atomic(out / "report.json", "{}")
    assert victim.read_text() == "precious"
    assert not (out / "report.json").is_symlink() and (out / "report.json").read_text() == "{}"


def test_a_folder_in_the_way_is_one_error_and_nothing_changes(tmp_path: Path) -> None:
    (tmp_path / "report.json").mkdir()
    with pytest.raises(CheckpointError, match="report.json: cannot write the report"):
        write_atomic(tmp_path / "report.json", "{}", "the report")
    assert (tmp_path / "report.json").is_dir() and not list(tmp_path.glob(".*tmp"))


def test_disk_full_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "r.json"
    target.write_text("old")

    def full(file, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "_flush", full)
    with pytest.raises(DiskFullError, match="disk full"):
        write_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_failing_writer_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "plot.png"
    target.write_bytes(b"old")

    def broken(tmp: Path) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    with pytest.raises(CheckpointError, match="Permission denied"):
        write_atomic(target, broken, "a plot")
    assert target.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1
