"""Bundles under damage: a corrupt Parquet file is bad input (one line, exit 2); a full disk
under --out is one line and leaves no Parquet file without a manifest."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_agent
from tests.harden_helpers import mounted_tmpfs


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "good"
    result = run_agent("audit", "--probes", "host", "--duration", "1", "--interval", "0.2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def damaged(bundle: Path, tmp_path: Path, how: str) -> Path:
    copy = tmp_path / f"damaged-{how}"
    shutil.copytree(bundle, copy)
    target = copy / "host.parquet"
    data = bytearray(target.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "footer-flipped":
        for offset in range(len(data) - 40, len(data) - 8):
            data[offset] ^= 0xFF
    elif how == "garbage":
        data = bytearray(b"this is not parquet at all\n" * 40)
    elif how == "empty":
        data = bytearray()
    target.write_bytes(bytes(data))
    return copy


@pytest.mark.parametrize("how", ["truncated", "footer-flipped", "garbage", "empty"])
def test_corrupt_parquet_in_a_bundle_is_one_line_exit_2(bundle, tmp_path, how):
    candidate = damaged(bundle, tmp_path, how)
    result = run_agent("gate", "--baseline", str(bundle), "--candidate", str(candidate), "--no-record")
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "host.parquet: not a readable Parquet file" in lines[0], result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr


def test_bundle_reader_raises_bad_input(bundle, tmp_path):
    from core.errors import BadInput
    from reports.bundle import Bundle

    with pytest.raises(BadInput, match="not a readable Parquet file"):
        Bundle(damaged(bundle, tmp_path, "truncated")).table("host")


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real tmpfs of a few pages, mounted for this test and unmounted after."""
    with contextlib.ExitStack() as stack:
        yield lambda size_bytes: stack.enter_context(
            mounted_tmpfs(tmp_path / f"full-{os.getpid()}", f"size={size_bytes},mode=0755"))


@pytest.mark.live
@pytest.mark.parametrize("size_bytes", [16 << 10, 64 << 10])
def test_full_disk_under_out_is_one_line_and_leaves_no_orphan_parquet(tiny_tmpfs, size_bytes):
    """16 KiB: the first table does not fit; 64 KiB: some tables fit before the disk fills."""
    mount_point = tiny_tmpfs(size_bytes)
    # Fill what is left but a few KiB, so the run gets into its writes before ENOSPC.
    filler = mount_point / "filler"
    free = os.statvfs(mount_point).f_bavail * os.statvfs(mount_point).f_frsize
    filler.write_bytes(b"\0" * max(0, free - (12 << 10 if size_bytes > 16 << 10 else 0)))
    out = mount_point / "bundle"
    result = run_agent("audit", "--probes", "host,kernel", "--duration", "1", "--interval", "0.05",
                       "--out", str(out))
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "No space left on device" in lines[0] and "removed the incomplete bundle" in lines[0], lines[0]
    assert "internal error" not in result.stderr
    leftovers = [p for p in mount_point.rglob("*") if p != filler]
    assert leftovers == [], f"left behind: {leftovers}"
