"""Downloading official weights and datasets: atomic, size-checked, and never running yaml code.

Only `urllib` is used. `file://` URLs work like any other, which is how the tests exercise this
module without a network. Nothing here runs at import.

Command line:
    python -m utils.data.downloads --weights yolov5n.pt yolov5s.pt --dest weights
    python -m utils.data.downloads --data data/coco128.yaml
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from pathlib import Path
from typing import Any

import yaml

from utils.paths import ROOT as REPO_ROOT

LOGGER = logging.getLogger(__name__)

WEIGHTS_BASE_URL = "https://github.com/ultralytics/yolov5/releases/download/v7.0"
WEIGHTS_URL_ENV = "YQ_WEIGHTS_URL"  # overrides WEIGHTS_BASE_URL, e.g. a mirror or file:// folder
OFFICIAL_WEIGHTS: tuple[str, ...] = ("yolov5n.pt", "yolov5s.pt", "yolov5m.pt", "yolov5l.pt",
                                     "yolov5x.pt")
# Checksums of the official files we have verified; other names are logged, not checked.
KNOWN_SHA256: dict[str, str] = {
    "yolov5n.pt": "4f180cf23ba0717ada0badd6c685026d73d48f184d00fc159c2641284b2ac0a3",
    "yolov5s.pt": "c3b140f32001a9eec4afa07120b3851eb1b6c2c7c7e7a4303af9eadfacbeb598",
}
_SCHEMES = ("http", "https", "file")
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download failed or produced a file that fails its checks."""


class UnsafeArchiveError(ValueError):
    """An archive member would be written outside the extraction folder."""


class DownloadRefused(ValueError):
    """A dataset yaml asks for something other than URLs to download (e.g. a script)."""


def is_url(value: Any) -> bool:
    """True for a string that is an http(s) or file URL."""
    if not isinstance(value, str):
        return False
    parsed = urllib.parse.urlparse(value.strip())
    return parsed.scheme in _SCHEMES and bool(parsed.netloc or parsed.path)


def sha256sum(file: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _progress_bar(total: int | None, desc: str):
    """A tqdm bar on interactive terminals only; tqdm stays an optional nicety."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=None, leave=False)


def _fetch(url: str, out, timeout: float, progress: bool) -> int:
    """Stream `url` into the open binary file `out`; return the byte count."""
    request = urllib.request.Request(url, headers={"User-Agent": "yolov5-qat-downloader"})
    n = 0
    with urllib.request.urlopen(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        bar = _progress_bar(total, Path(urllib.parse.urlparse(url).path).name) if progress \
            else None
        try:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                out.write(chunk)
                n += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
    if total is not None and n != total:
        raise DownloadError(f"{url}: connection closed after {n} of {total} bytes")
    return n


def safe_download(url: str, file: str | Path, min_bytes: float = 1e0, timeout: float = 30.0,
                  sha256: str | None = None, progress: bool = True) -> Path:
    """Download `url` to `file` atomically and return `file`.

    The data goes to a temporary file beside the target and is renamed into place only after
    the size (at least `min_bytes`) and, when given, the sha256 check pass, so a failure never
    leaves a partial or wrong target. Raises DownloadError naming the URL.

    Example:
        >>> safe_download(Path("a.zip").resolve().as_uri(), "copy.zip")  # doctest: +SKIP
    """
    if not is_url(url):
        raise DownloadError(f"{url!r}: not an http(s) or file:// URL")
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    # A unique hidden name beside the target keeps the final rename atomic (same filesystem);
    # open() rather than mkstemp() so the file gets the usual permissions, not 0600.
    tmp = file.with_name(f".{file.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    try:
        with open(tmp, "xb") as out:
            LOGGER.info("Downloading %s to %s", url, file)
            n = _fetch(url, out, timeout, progress)
        if n < min_bytes:
            raise DownloadError(f"{url}: got {n} bytes, expected at least {int(min_bytes)}")
        digest = sha256sum(tmp) if sha256 is not None else None
        if digest is not None and digest != sha256.lower():
            raise DownloadError(f"{url}: sha256 {digest} does not match {sha256}")
        os.replace(tmp, file)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        raise DownloadError(f"{url}: download failed ({err})") from err
    finally:
        tmp.unlink(missing_ok=True)  # no-op after the rename; removes the partial file otherwise
    return file


def attempt_download_weights(name: str | Path, dest_dir: str | Path = "weights",
                             base_url: str | None = None, min_bytes: float = 1e5) -> Path:
    """Return a local path for weights `name`, downloading an official checkpoint if missing.

    An existing path is returned as is. A bare official name (yolov5n/s/m/l/x.pt) is fetched
    into `dest_dir` from `base_url`, else from the `YQ_WEIGHTS_URL` environment variable, else
    from the v7.0 release. A path with folders downloads to that path instead.
    """
    path = Path(name)
    if path.is_file():
        return path
    target = Path(dest_dir) / path.name if path.parent == Path(".") else path
    if target.is_file():
        return target
    if path.name not in OFFICIAL_WEIGHTS:
        raise FileNotFoundError(f"{name}: weights not found, and not an official checkpoint "
                                f"name ({', '.join(OFFICIAL_WEIGHTS)})")
    base = base_url or os.environ.get(WEIGHTS_URL_ENV) or WEIGHTS_BASE_URL
    safe_download(f"{base.rstrip('/')}/{path.name}", target, min_bytes=min_bytes)
    digest = sha256sum(target)
    known = KNOWN_SHA256.get(path.name)
    if known is None or digest == known:
        LOGGER.info("%s: sha256 %s%s", target, digest, " (known good)" if known else "")
    else:
        # Ultralytics re-uploaded some files between releases, so a mismatch is worth a warning
        # but not a refusal; loading still goes through the checkpoint allowlist.
        LOGGER.warning("%s: sha256 %s differs from the checked file %s", target, digest, known)
    return target


def unzip_file(file: str | Path, path: str | Path | None = None,
               exclude: tuple[str, ...] = (".DS_Store", "__MACOSX")) -> Path:
    """Extract a zip into `path` (default: beside it) and return `path`.

    Every member is checked before anything is written: a name that is absolute or would land
    outside `path` (zip-slip) raises UnsafeArchiveError and nothing is extracted.
    """
    file = Path(file)
    dest = Path(path) if path is not None else file.parent
    dest_resolved = dest.resolve()
    with zipfile.ZipFile(file) as archive:
        members = [m for m in archive.infolist() if not any(x in m.filename for x in exclude)]
        for member in members:
            name = member.filename
            target = (dest_resolved / name).resolve()
            if Path(name).is_absolute() or name.startswith(("/", "\\")) or \
                    not target.is_relative_to(dest_resolved):
                raise UnsafeArchiveError(f"{file}: member {name!r} would extract outside {dest}")
        dest.mkdir(parents=True, exist_ok=True)
        for member in members:
            archive.extract(member, dest_resolved)
    return dest


def _download_items(download: Any) -> list[tuple[str, str | None]]:
    """Normalise a yaml `download:` value to (url, dir) pairs, or refuse it."""
    items = download if isinstance(download, list) else [download]
    pairs: list[tuple[str, str | None]] = []
    for item in items:
        url, sub = (item.get("url"), item.get("dir")) if isinstance(item, dict) else (item, None)
        if not is_url(url) or (sub is not None and not isinstance(sub, str)):
            raise DownloadRefused(
                f"dataset 'download' entry {str(item)[:80]!r} is not a URL (or {{url, dir}} "
                "mapping); scripts in dataset yamls are never run. Download the dataset "
                "manually and set 'path' to it")
        pairs.append((url.strip(), sub))
    return pairs


def download_dataset(data_dict: dict[str, Any], data_root: str | Path,
                     keep_archives: bool = False, timeout: float = 60.0) -> Path:
    """Fetch a dataset from its yaml `download:` key into the dataset folder `data_root`.

    `data_root` is the dataset folder the yaml's `path` resolves to. `download` may be a URL,
    a list of URLs, or a list mixing URLs and `{url: ..., dir: ...}` mappings. A zip without
    `dir` is extracted into the folder that holds `data_root` (official zips carry their own
    top folder, e.g. `coco128/`); with `dir` it goes to `data_root / dir`. Other files are saved
    as they are. Anything else (a shell or Python script) raises DownloadRefused; nothing is
    ever executed. A key `synthetic:` (a mapping) generates the shapes dataset instead.
    """
    root = Path(data_root)
    if isinstance(data_dict.get("synthetic"), dict):
        from utils.data.synthetic import ensure_synthetic_dataset  # only needed for this case

        ensure_synthetic_dataset(root, **data_dict["synthetic"])
        return root
    if not data_dict.get("download"):
        raise DownloadRefused(f"{root}: dataset not found and its yaml has no 'download' URL; "
                              "download it manually")
    plan = []
    for url, sub in _download_items(data_dict["download"]):  # check every entry before fetching
        dest = root / sub if sub is not None else root.parent
        if not dest.resolve().is_relative_to(root.parent.resolve()):
            raise DownloadRefused(f"{url}: 'dir' {sub!r} leaves the datasets folder {root.parent}")
        plan.append((url, dest))
    for url, dest in plan:
        name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
        if not name:
            raise DownloadRefused(f"{url}: URL names no file to save")
        file = dest / name
        if not file.is_file():  # a previous, interrupted run may have left the archive
            safe_download(url, file, min_bytes=1, timeout=timeout)
        if file.suffix.lower() == ".zip":
            LOGGER.info("Unzipping %s to %s", file, dest)
            unzip_file(file, dest)
            if not keep_archives:
                file.unlink()
    return root


def resolve_dataset_root(data_dict: dict[str, Any], yaml_file: str | Path | None = None) -> Path:
    """The dataset folder a yaml's `path` names: the loader's own rule (utils.data.data_config.resolve_root),
    so downloads land where the loader will look."""
    from utils.data.data_config import resolve_root

    return resolve_root(data_dict.get("path"), Path(yaml_file).resolve().parent if yaml_file else None)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Download official weights or a dataset.")
    parser.add_argument("--weights", nargs="*", default=[],
                        help=f"official names: {' '.join(OFFICIAL_WEIGHTS)}")
    parser.add_argument("--dest", default=str(REPO_ROOT / "weights"), help="weights folder")
    parser.add_argument("--base-url", default=None, help="release URL (mirror or file://)")
    parser.add_argument("--data", default=None, help="dataset yaml whose 'download' to fetch")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns an exit code."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.weights and not args.data:
        LOGGER.error("nothing to do: pass --weights NAME... and/or --data YAML")
        return 2
    try:
        for name in args.weights:
            print(attempt_download_weights(name, args.dest, args.base_url))
        if args.data:
            data = yaml.safe_load(Path(args.data).read_text())
            print(download_dataset(data, resolve_dataset_root(data, args.data)))
    except (DownloadError, DownloadRefused, UnsafeArchiveError, FileNotFoundError, OSError,
            yaml.YAMLError, zipfile.BadZipFile) as err:
        LOGGER.error("download: %s", err)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
