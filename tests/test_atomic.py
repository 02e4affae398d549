"""minigpt.atomic: a destination is the old file or the complete new one, never a torn one."""

import os
import stat
import subprocess
import sys

import pytest

from minigpt.atomic import atomic_write, atomic_write_text, atomic_writer, sweep_orphans


def test_writes_whole_file_with_mode_0644(tmp_path):
    dest = tmp_path / "sub" / "f.bin"
    with atomic_writer(dest) as (f, tmp):
        f.write(b"abc")
        assert tmp.parent == dest.parent and not dest.exists()
    assert dest.read_bytes() == b"abc"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644
    assert os.listdir(dest.parent) == ["f.bin"]


def test_failure_keeps_old_file_and_removes_temporary(tmp_path):
    dest = tmp_path / "f.txt"
    atomic_write_text(dest, "old")
    with pytest.raises(RuntimeError):
        with atomic_writer(dest) as (f, _):
            f.write(b"new but broken")
            raise RuntimeError("verification failed")
    assert dest.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_atomic_write_with_path_writer(tmp_path):
    dest = tmp_path / "g.txt"
    atomic_write(dest, lambda tmp: tmp.write_text("via path"))
    assert dest.read_text() == "via path"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644


def test_sweep_removes_only_dead_writers_files(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    orphan = tmp_path / f".model.safetensors.{dead_pid}.abc123.tmp"
    live = tmp_path / f".model.safetensors.{os.getpid()}.xyz789.tmp"
    other = tmp_path / "notes.tmp"
    for f in (orphan, live, other):
        f.write_bytes(b"x")
    assert sweep_orphans(tmp_path) == [orphan]
    assert live.exists() and other.exists() and not orphan.exists()


def test_a_write_sweeps_orphans_in_its_folder(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    orphan = tmp_path / f".train.bin.{int(dead.stdout)}.q1w2e3.tmp"
    orphan.write_bytes(b"half a file")
    atomic_write_text(tmp_path / "meta.json", "{}")
    assert not orphan.exists()
