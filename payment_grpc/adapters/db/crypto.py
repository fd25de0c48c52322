"""Field-level encryption at rest for sensitive columns (AES-256-GCM, PCI DSS 3.5-3.7).

Stored format (ASCII): ``enc:v1:<kid>:<base64url(nonce || ciphertext || tag)>`` without
padding; a 12-byte random nonce per value. The associated data binds the value to its key
id, its column and its row id, so a ciphertext copied to another column or row does not
decrypt. Several keys may be configured: the first (newest) encrypts, all decrypt, and
`payment-grpc rotate-keys` re-encrypts values written under an older one.

A value without the ``enc:`` prefix is legacy plaintext written before encryption was on
(no token, VPA or JSON object starts with it); it reads as is and `rotate-keys` encrypts
it. Everything else that does not decrypt raises `DecryptionError`: never garbage.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MARKER = "enc:"
VERSION = "v1"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
KID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_MARKER_BYTES = MARKER.encode("ascii")
LOCAL_KID = "local"  # the key generated into DATA_DIR when ENCRYPTION_KEYS is unset


class KeyConfigError(ValueError):
    """ENCRYPTION_KEYS (or the generated key file) is malformed. Never holds key material."""


class DecryptionError(Exception):
    """A stored value could not be decrypted: unknown key id, wrong column/row, tampered."""


@dataclass(frozen=True, slots=True)
class EncryptionKey:
    kid: str
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not KID_PATTERN.fullmatch(self.kid):
            raise KeyConfigError(
                f"key id {self.kid[:40]!r} must be 1-32 characters of A-Z a-z 0-9 _ . -"
            )
        if len(self.key) != KEY_BYTES:
            raise KeyConfigError(
                f"key {self.kid!r} is {len(self.key)} bytes; AES-256-GCM needs {KEY_BYTES}"
            )


def decode_key(text: str) -> bytes:
    """Standard or URL-safe base64, padding optional."""
    cleaned = text.strip().replace("-", "+").replace("_", "/")
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyConfigError("is not valid base64") from exc


def parse_keys(spec: str, *, source: str = "ENCRYPTION_KEYS") -> list[EncryptionKey]:
    """`kid:base64key[,kid:base64key...]`, newest first. Errors name the entry, never the key."""
    entries = [entry.strip() for entry in spec.split(",")]
    entries = [entry for entry in entries if entry]
    if not entries:
        raise KeyConfigError(f"{source} is set but holds no key (expected kid:base64key,...)")
    keys: list[EncryptionKey] = []
    for number, entry in enumerate(entries, 1):
        kid, colon, material = entry.partition(":")
        kid = kid.strip()
        where = f"{source} entry {number}"
        if not colon or not material.strip():
            raise KeyConfigError(f"{where} must be kid:base64key")
        try:
            key = EncryptionKey(kid, decode_key(material))
        except KeyConfigError as exc:
            name = f" ({kid!r})" if KID_PATTERN.fullmatch(kid) else ""
            raise KeyConfigError(f"{where}{name}: {exc}") from None
        if any(existing.kid == kid for existing in keys):
            raise KeyConfigError(f"{where}: key id {kid!r} appears twice")
        keys.append(key)
    return keys


def _b64encode(blob: bytes) -> str:
    return base64.urlsafe_b64encode(blob).rstrip(b"=").decode("ascii")


_FROM_URLSAFE = str.maketrans("-_", "+/")


def _b64decode(text: str) -> bytes:
    """Strict: any character outside the base64url alphabet is an error, not skipped."""
    if "+" in text or "/" in text:
        raise binascii.Error("not base64url")
    padded = text.translate(_FROM_URLSAFE) + "=" * (-len(text) % 4)
    return base64.b64decode(padded, validate=True)


class FieldCipher:
    """Encrypts and decrypts column values. AESGCM objects are built once per key."""

    def __init__(self, keys: Sequence[EncryptionKey]) -> None:
        if not keys:
            raise KeyConfigError("at least one encryption key is required")
        self._keys = {key.kid: AESGCM(key.key) for key in keys}
        if len(self._keys) != len(keys):
            raise KeyConfigError("key ids must be unique")
        self._current_kid = keys[0].kid
        self._current = self._keys[self._current_kid]
        self._current_prefix = f"{MARKER}{VERSION}:{self._current_kid}:"

    @classmethod
    def from_spec(cls, spec: str, *, source: str = "ENCRYPTION_KEYS") -> FieldCipher:
        return cls(parse_keys(spec, source=source))

    @property
    def current_kid(self) -> str:
        return self._current_kid

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    @property
    def current_prefix(self) -> str:
        """What every value written under the newest key starts with."""
        return self._current_prefix

    # --- text columns -------------------------------------------------------------------

    def encrypt(self, plaintext: str, *, column: str, row_id: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._current.encrypt(
            nonce, plaintext.encode("utf-8"), _aad(self._current_kid, column, row_id)
        )
        return self._current_prefix + _b64encode(nonce + sealed)

    def decrypt(self, stored: str, *, column: str, row_id: str) -> str:
        if not stored.startswith(MARKER):
            return stored  # legacy plaintext, see the module docstring
        plaintext = self._open(stored, column, row_id)
        try:
            return plaintext.decode("utf-8")
        except UnicodeDecodeError as exc:  # pragma: no cover - authenticated, so never
            raise DecryptionError(f"{column} of {row_id}: not UTF-8") from exc

    def reencrypt(self, stored: str, *, column: str, row_id: str) -> str:
        """The value under the newest key (unchanged when it already is)."""
        if stored.startswith(self._current_prefix):
            return stored
        plaintext = self.decrypt(stored, column=column, row_id=row_id)
        return self.encrypt(plaintext, column=column, row_id=row_id)

    # --- binary columns (same format, ASCII-encoded) -----------------------------------

    def encrypt_bytes(self, data: bytes, *, column: str, row_id: str) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._current.encrypt(nonce, data, _aad(self._current_kid, column, row_id))
        return (self._current_prefix + _b64encode(nonce + sealed)).encode("ascii")

    def decrypt_bytes(self, stored: bytes, *, column: str, row_id: str) -> bytes:
        if not stored.startswith(_MARKER_BYTES):
            return stored  # legacy plaintext
        try:
            text = stored.decode("ascii")
        except UnicodeDecodeError as exc:
            raise DecryptionError(f"{column} of {row_id}: malformed encrypted value") from exc
        return self._open(text, column, row_id)

    def reencrypt_bytes(self, stored: bytes, *, column: str, row_id: str) -> bytes:
        if stored.startswith(self._current_prefix.encode("ascii")):
            return stored
        data = self.decrypt_bytes(stored, column=column, row_id=row_id)
        return self.encrypt_bytes(data, column=column, row_id=row_id)

    # --- internals ----------------------------------------------------------------------

    def _open(self, stored: str, column: str, row_id: str) -> bytes:
        parts = stored.split(":", 3)
        if len(parts) != 4 or parts[1] != VERSION:
            raise DecryptionError(f"{column} of {row_id}: unsupported encrypted format")
        _, _, kid, body = parts
        aead = self._keys.get(kid)
        if aead is None:
            raise DecryptionError(
                f"{column} of {row_id}: unknown key id {kid[:40]!r}"
                f" (configured: {', '.join(self._keys)}); add it to ENCRYPTION_KEYS"
            )
        try:
            blob = _b64decode(body)
        except (binascii.Error, ValueError) as exc:
            raise DecryptionError(f"{column} of {row_id}: malformed encrypted value") from exc
        if len(blob) < NONCE_BYTES + TAG_BYTES:
            raise DecryptionError(f"{column} of {row_id}: malformed encrypted value")
        try:
            return aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _aad(kid, column, row_id))
        except InvalidTag as exc:
            raise DecryptionError(
                f"{column} of {row_id}: authentication failed under key {kid!r}"
                " (tampered, or moved from another row or column)"
            ) from exc


def _aad(kid: str, column: str, row_id: str) -> bytes:
    return f"{MARKER}{VERSION}:{kid}\x00{column}\x00{row_id}".encode()


def generated_key(secret: str, *, source: str) -> EncryptionKey:
    """The embedded default's key, kid `local`, from its DATA_DIR file (base64url text)."""
    try:
        return EncryptionKey(LOCAL_KID, decode_key(secret))
    except KeyConfigError as exc:
        raise KeyConfigError(f"{source}: {exc}") from None
