"""Where data sets are looked for, and fetching them (MD5-checked) when they are not on disk."""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["cache_dir", "search_dirs", "fetch", "md5"]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "l2b"


def search_dirs(cfg, sub: str) -> list[Path]:
    dirs = []
    for base in (cfg.data_dir, os.environ.get("L2B_DATA")):
        if base:
            dirs += [Path(base), Path(base) / sub]
    dirs.append(cache_dir() / sub)
    return dirs


def fetch(base_url: str, files: dict[str, str], target: Path, timeout: float = 30.0) -> None:
    """Download files with MD5 checks; a partial or corrupt file never lands under its final name."""
    target.mkdir(parents=True, exist_ok=True)
    for name, md5 in files.items():
        final = target / name
        if final.is_file() and md5(final) == md5:
            continue
        log.info("fetching %s%s", base_url, name)
        tmp = final.with_suffix(final.suffix + ".part")
        with urllib.request.urlopen(base_url + name, timeout=timeout) as resp, open(tmp, "wb") as out:
            out.write(resp.read())
        if md5(tmp) != md5:
            tmp.unlink(missing_ok=True)
            raise OSError(f"checksum mismatch for {name}")
        os.replace(tmp, final)


def md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
