"""checksums.json: the sha256 of every file of a folder, and this install's signature over them.

    write_checksums(folder, ["config.json", "weights.safetensors"])   # at export
    signed = verify_checksums(folder)   # TamperedFileError names a changed or unlisted file;
                                        # True when this install's key signed it (made here)

The signature is HMAC-SHA256 over the sorted file table with a 32-byte key kept in
`$DSNO_KEY_FILE` or `~/.config/dsno/signing.key` (made on first use, mode 0600). It only tells
"made by this install" from "came from elsewhere"; it is not a public-key signature.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from pathlib import Path
from typing import Iterable

from dsno.atomic import atomic_write_text
from dsno.errors import UserError
from dsno.jsonfile import read_json_file

CHECKSUM_FILE = "checksums.json"
FORMAT_VERSION = 1
KEY_BYTES = 32
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class TamperedFileError(UserError):
    """A file of a checksummed folder is changed, missing or unlisted."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def key_path() -> Path:
    """Where this install's signing key lives."""
    if os.environ.get("DSNO_KEY_FILE"):
        return Path(os.environ["DSNO_KEY_FILE"])
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "dsno" / "signing.key"


def _read_key(create: bool) -> bytes | None:
    path = key_path()
    if not path.is_file():
        if not create:
            return None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return _read_key(create=False)
        except OSError as e:
            raise UserError(f"cannot create this install's signing key at {path} ({e.strerror or e}); set "
                            "DSNO_KEY_FILE to a writable file path") from None
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(KEY_BYTES))
            f.flush()
            os.fsync(f.fileno())
    key = path.read_bytes()
    return key if len(key) == KEY_BYTES else None


def _signature(key: bytes, files: dict[str, str]) -> str:
    return hmac.new(key, json.dumps(files, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def write_checksums(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Write folder/checksums.json for the files `names` (plain names inside folder), signed."""
    folder = Path(folder)
    files = {name: sha256_file(folder / _plain(name, folder)) for name in sorted(names)}
    record = {"format_version": FORMAT_VERSION, "files": files, "signature": _signature(_read_key(True), files)}
    atomic_write_text(folder / CHECKSUM_FILE, json.dumps(record, indent=2) + "\n")


def _plain(name: str, folder: Path) -> str:
    if not isinstance(name, str) or not _PLAIN_NAME.match(name) or name == CHECKSUM_FILE:
        raise TamperedFileError(f"{folder / CHECKSUM_FILE} lists {name!r}: only plain file names inside the "
                                "folder are allowed; re-export the folder")
    return name


def read_checksums(folder: str | os.PathLike) -> dict:
    """The parsed checksums.json of `folder`; TamperedFileError when missing or malformed."""
    folder = Path(folder)
    path = folder / CHECKSUM_FILE
    hint = "re-export it with `python -m dsno.export run_dir=RUN` from a source you trust"
    if path.is_symlink():
        raise TamperedFileError(f"{path} is a symbolic link; the folder's files must be plain files inside it; {hint}")
    if not path.is_file():
        raise TamperedFileError(f"{path} is missing, so the folder's files cannot be checked; {hint}")
    record = read_json_file(path, TamperedFileError, hint, expect=dict)
    files = record.get("files")
    if not (isinstance(files, dict) and all(isinstance(v, str) for v in files.values())
            and isinstance(record.get("signature"), str)):
        raise TamperedFileError(f"{path} must hold 'files' {{name: sha256}} and a 'signature'; {hint}")
    for name in files:
        _plain(name, folder)
    return record


def verify_checksums(folder: str | os.PathLike, required: Iterable[str] = ()) -> bool:
    """Check every listed file that is present against its sha256; `required` files must be
    listed and present (a listed file may be left out of a copy, e.g. an unused form).

    Returns True when this install's key signed the table (the folder was made here), False
    when it came from elsewhere. Raises TamperedFileError naming the first bad file."""
    folder = Path(folder)
    record = read_checksums(folder)
    files: dict[str, str] = record["files"]
    required = set(required)
    for name in sorted(required):
        if name not in files:
            raise TamperedFileError(f"{folder / name} is not listed in {folder / CHECKSUM_FILE}; "
                                    "re-export the folder")
    for name, expected in files.items():
        path = folder / name
        if name not in required and not path.exists() and not path.is_symlink():
            continue
        if path.is_symlink() or not path.is_file():
            raise TamperedFileError(f"{path} is missing or not a regular file (listed in {CHECKSUM_FILE}); "
                                    "re-export the folder")
        if sha256_file(path) != expected:
            raise TamperedFileError(f"{path} was changed after export (its sha256 differs from "
                                    f"{CHECKSUM_FILE}); re-export the folder or copy it again")
    key = _read_key(create=False)
    return key is not None and hmac.compare_digest(_signature(key, files), record["signature"])
