"""Local secrets for the embedded default: created once in DATA_DIR with mode 0600."""

from __future__ import annotations

import os
import pathlib
import secrets


def load_or_create_secret(path: pathlib.Path, nbytes: int = 32) -> str:
    """Return the secret stored at `path`, creating it (0600, never overwritten) if absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as file:
        file.write(secrets.token_urlsafe(nbytes))
    return path.read_text().strip()
