"""Download a standard HR photo set, check its checksum and unpack it.

    python scripts/download_dataset.py div2k-train data/
    python scripts/download_dataset.py --list

The archives, their sizes and checksums are listed in scripts/datasets.txt. A download goes to
NAME.part and is renamed once complete, so an interrupted run starts again cleanly; an archive
that is already there and matches is not fetched again. A size or checksum mismatch stops the
script with exit code 1 and keeps the file as NAME.mismatch for inspection. Unpacking refuses
members that would land outside the destination. The last line printed is the folder of HR
images, for `deflow-synth degrade`.
"""

import argparse
import hashlib
import shutil
import sys
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

LIST = Path(__file__).with_name("datasets.txt")
CHUNK = 1 << 20


@dataclass(frozen=True)
class Dataset:
    """One archive of scripts/datasets.txt."""

    name: str
    url: str
    size: int | None
    algorithm: str
    digest: str
    hr_folder: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def read_list(path: Path = LIST) -> dict[str, Dataset]:
    """The datasets of the list file, by name."""
    datasets = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, url, size, checksum, hr_folder = line.split()
        algorithm, digest = checksum.split(":", 1)
        datasets[name] = Dataset(
            name, url, None if size == "-" else int(size), algorithm, digest, hr_folder
        )

    return datasets


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)

    return digest.hexdigest()


def mismatch(dataset: Dataset, path: Path) -> str | None:
    """Why the file is not the expected archive, or None when it is."""
    size = path.stat().st_size
    if dataset.size is not None and size != dataset.size:
        return f"size {size} bytes, expected {dataset.size}"
    actual = file_digest(path, dataset.algorithm)
    if actual != dataset.digest:
        return f"{dataset.algorithm} {actual}, expected {dataset.digest}"

    return None


def download(dataset: Dataset, archive: Path) -> None:
    """Fetch the archive to a .part file and rename it when complete."""
    partial = archive.with_name(archive.name + ".part")
    print(f"downloading {dataset.url}", file=sys.stderr)
    with urllib.request.urlopen(dataset.url) as response, open(partial, "wb") as file:
        shutil.copyfileobj(response, file, CHUNK)
    partial.replace(archive)


def unpack(archive: Path, destination: Path) -> None:
    """Extract a zip or tar archive, refusing members outside the destination."""
    root = destination.resolve()
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as bundle:
            names = bundle.namelist()
            check_members(root, names)
            bundle.extractall(destination)
        return

    with tarfile.open(archive) as bundle:
        members = bundle.getmembers()
        check_members(root, [m.name for m in members])
        if any(m.issym() or m.islnk() for m in members):
            raise SystemExit(f"error: {archive} holds links; not unpacked")
        bundle.extractall(destination)


def check_members(root: Path, names: list[str]) -> None:
    for name in names:
        if not (root / name).resolve().is_relative_to(root):
            raise SystemExit(f"error: archive member {name!r} would land outside {root}")


def main() -> None:
    """Command line: download, check and unpack one dataset."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", help="dataset name from scripts/datasets.txt")
    parser.add_argument("destination", nargs="?", type=Path, help="folder for archive and images")
    parser.add_argument("--list", action="store_true", help="list the known datasets")
    parser.add_argument("--datasets", type=Path, default=LIST, help="the list file to read")
    args = parser.parse_args()

    datasets = read_list(args.datasets)
    if args.list or args.name is None:
        for dataset in datasets.values():
            print(f"{dataset.name}  {dataset.url}")
        return
    if args.name not in datasets or args.destination is None:
        parser.error(f"expected a name among {', '.join(datasets)} and a destination folder")

    dataset = datasets[args.name]
    args.destination.mkdir(parents=True, exist_ok=True)
    archive = args.destination / dataset.filename
    if archive.exists() and mismatch(dataset, archive) is None:
        print(f"{archive} is already there and matches", file=sys.stderr)
    else:
        download(dataset, archive)
        reason = mismatch(dataset, archive)
        if reason is not None:
            kept = archive.with_name(archive.name + ".mismatch")
            archive.replace(kept)
            print(f"error: {dataset.url}: {reason}; kept as {kept}", file=sys.stderr)
            sys.exit(1)

    hr_folder = args.destination / dataset.hr_folder
    if not hr_folder.is_dir():
        unpack(archive, args.destination)
    if not hr_folder.is_dir():
        print(f"error: {archive} holds no {dataset.hr_folder}/", file=sys.stderr)
        sys.exit(1)
    print(hr_folder)


if __name__ == "__main__":
    main()
