"""Tests of scripts/download_dataset.py on local archives (file:// URLs, no network)."""

import hashlib
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "download_dataset.py"


def run(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), *arguments]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)


def zip_archive(path: Path) -> bytes:
    with zipfile.ZipFile(path, "w") as bundle:
        bundle.writestr("Set_HR/0001.png", b"not really a png")
        bundle.writestr("Set_HR/0002.png", b"another one")
    return path.read_bytes()


def write_list(path: Path, archive: Path, size: str, checksum: str, hr_folder: str) -> Path:
    path.write_text(f"# test\nset  {archive.as_uri()}  {size}  {checksum}  {hr_folder}\n")
    return path


def test_archive_is_checked_unpacked_and_not_fetched_twice(tmp_path):
    data = zip_archive(tmp_path / "Set.zip")
    digest = hashlib.sha256(data).hexdigest()
    listing = write_list(
        tmp_path / "list.txt", tmp_path / "Set.zip", str(len(data)), f"sha256:{digest}", "Set_HR"
    )
    destination = tmp_path / "data"

    first = run("--datasets", str(listing), "set", str(destination))
    second = run("--datasets", str(listing), "set", str(destination))

    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == str(destination / "Set_HR")
    assert sorted(p.name for p in (destination / "Set_HR").iterdir()) == ["0001.png", "0002.png"]
    assert "downloading" in first.stderr
    assert second.returncode == 0 and "already there and matches" in second.stderr


def test_checksum_mismatch_fails_loudly_and_keeps_the_file(tmp_path):
    data = zip_archive(tmp_path / "Set.zip")
    listing = write_list(
        tmp_path / "list.txt",
        tmp_path / "Set.zip",
        "-",
        f"md5:{hashlib.md5(data + b'x').hexdigest()}",
        "Set_HR",
    )
    destination = tmp_path / "data"

    result = run("--datasets", str(listing), "set", str(destination))

    assert result.returncode == 1
    assert "md5" in result.stderr and "expected" in result.stderr
    assert (destination / "Set.zip.mismatch").is_file()
    assert not (destination / "Set_HR").exists() and not (destination / "Set.zip").exists()


def test_size_mismatch_is_caught_before_hashing(tmp_path):
    data = zip_archive(tmp_path / "Set.zip")
    listing = write_list(
        tmp_path / "list.txt",
        tmp_path / "Set.zip",
        str(len(data) + 1),
        "sha256:" + "0" * 64,
        "Set_HR",
    )

    result = run("--datasets", str(listing), "set", str(tmp_path / "data"))

    assert result.returncode == 1 and f"size {len(data)} bytes" in result.stderr


def test_tar_member_outside_the_destination_is_refused(tmp_path):
    payload = tmp_path / "evil.txt"
    payload.write_text("x")
    with tarfile.open(tmp_path / "Set.tar", "w") as bundle:
        bundle.add(payload, arcname="../outside.txt")
    data = (tmp_path / "Set.tar").read_bytes()
    listing = write_list(
        tmp_path / "list.txt",
        tmp_path / "Set.tar",
        str(len(data)),
        f"sha256:{hashlib.sha256(data).hexdigest()}",
        "Set_HR",
    )

    result = run("--datasets", str(listing), "set", str(tmp_path / "data"))

    assert result.returncode != 0 and "outside" in result.stderr
    assert not (tmp_path / "outside.txt").exists()


def test_shipped_list_names_the_standard_sets():
    result = run("--list")

    assert result.returncode == 0
    assert [line.split()[0] for line in result.stdout.splitlines()] == [
        "div2k-train",
        "div2k-valid",
        "flickr2k",
    ]
