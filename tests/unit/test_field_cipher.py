"""FieldCipher: AES-256-GCM column values tagged with a key id, bound to column and row."""

from __future__ import annotations

import base64
import os
import pathlib
import re
import stat

import pytest

from payment_grpc.adapters.db.crypto import (
    DecryptionError,
    EncryptionKey,
    FieldCipher,
    KeyConfigError,
    parse_keys,
)
from payment_grpc.bootstrap import build_cipher
from payment_grpc.config import Settings

K1 = os.urandom(32)
K2 = os.urandom(32)
COL = "payments.method_token"


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def cipher(*pairs: tuple[str, bytes]) -> FieldCipher:
    return FieldCipher([EncryptionKey(kid, key) for kid, key in pairs])


def test_round_trip_and_format() -> None:
    c = cipher(("k1", K1))
    stored = c.encrypt("asha@okbank", column=COL, row_id="pay_1")
    assert stored.startswith("enc:v1:k1:")
    assert "asha" not in stored
    assert stored.isascii()
    assert c.decrypt(stored, column=COL, row_id="pay_1") == "asha@okbank"
    # a fresh nonce every time
    assert c.encrypt("asha@okbank", column=COL, row_id="pay_1") != stored


def test_unicode_and_empty_values() -> None:
    c = cipher(("k1", K1))
    for value in ("", '{"name": "Zoë Ünïcødé ✓"}'):
        assert c.decrypt(c.encrypt(value, column=COL, row_id="r"), column=COL, row_id="r") == value


def test_value_is_bound_to_its_column_and_row() -> None:
    c = cipher(("k1", K1))
    stored = c.encrypt("tok_secret", column=COL, row_id="pay_1")
    with pytest.raises(DecryptionError, match="authentication failed"):
        c.decrypt(stored, column="payments.metadata_json", row_id="pay_1")
    with pytest.raises(DecryptionError, match="authentication failed"):
        c.decrypt(stored, column=COL, row_id="pay_2")


def test_unknown_kid_fails_loudly() -> None:
    stored = cipher(("old", K1)).encrypt("tok_x", column=COL, row_id="p")
    with pytest.raises(DecryptionError, match="unknown key id 'old'"):
        cipher(("new", K2)).decrypt(stored, column=COL, row_id="p")


def test_same_kid_other_key_fails() -> None:
    stored = cipher(("k", K1)).encrypt("tok_x", column=COL, row_id="p")
    with pytest.raises(DecryptionError):
        cipher(("k", K2)).decrypt(stored, column=COL, row_id="p")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda s: s[:-2] + ("AA" if s[-2:] != "AA" else "BB"),  # tampered tag
        lambda s: s[:20],  # truncated
        lambda s: s.replace("enc:v1:", "enc:v9:"),  # unknown version
        lambda s: "enc:garbage",
        lambda s: s.replace(":k1:", ":k1:!!"),  # not base64
        lambda s: s.replace("enc:v1:k1:", "enc:v1:k2:"),  # kid swapped (kid is in the AAD)
    ],
)
def test_malformed_values_never_return_garbage(mangle: object) -> None:
    c = cipher(("k1", K1), ("k2", K1))
    stored = c.encrypt("tok_x", column=COL, row_id="p")
    with pytest.raises(DecryptionError):
        c.decrypt(mangle(stored), column=COL, row_id="p")  # type: ignore[operator]


def test_newest_encrypts_all_decrypt_and_reencrypt() -> None:
    old = cipher(("old", K1))
    both = cipher(("new", K2), ("old", K1))
    stored = old.encrypt("tok_x", column=COL, row_id="p")
    assert both.decrypt(stored, column=COL, row_id="p") == "tok_x"
    assert both.encrypt("tok_x", column=COL, row_id="p").startswith("enc:v1:new:")
    rotated = both.reencrypt(stored, column=COL, row_id="p")
    assert rotated.startswith("enc:v1:new:")
    assert cipher(("new", K2)).decrypt(rotated, column=COL, row_id="p") == "tok_x"
    assert both.reencrypt(rotated, column=COL, row_id="p") == rotated  # already current


def test_legacy_plaintext_reads_and_is_encrypted_by_reencrypt() -> None:
    c = cipher(("k1", K1))
    assert c.decrypt("tok_visa", column=COL, row_id="p") == "tok_visa"
    assert c.decrypt('{"a": "b"}', column=COL, row_id="p") == '{"a": "b"}'
    assert c.reencrypt("tok_visa", column=COL, row_id="p").startswith("enc:v1:k1:")
    assert c.decrypt_bytes(b"\n\x05hello", column=COL, row_id="p") == b"\n\x05hello"


def test_bytes_round_trip_bound_and_rotated() -> None:
    old = cipher(("old", K1))
    both = cipher(("new", K2), ("old", K1))
    body = bytes(range(256))
    stored = old.encrypt_bytes(body, column="t.body", row_id="r")
    assert stored.startswith(b"enc:v1:old:")
    assert both.decrypt_bytes(stored, column="t.body", row_id="r") == body
    with pytest.raises(DecryptionError):
        both.decrypt_bytes(stored, column="t.body", row_id="other")
    rotated = both.reencrypt_bytes(stored, column="t.body", row_id="r")
    assert rotated.startswith(b"enc:v1:new:")
    assert both.reencrypt_bytes(rotated, column="t.body", row_id="r") == rotated
    with pytest.raises(DecryptionError, match="unknown key id"):
        cipher(("new", K2)).decrypt_bytes(stored, column="t.body", row_id="r")


def test_longest_token_fits_the_method_token_column() -> None:
    c = cipher(("k" * 32, K1))  # the longest key id
    stored = c.encrypt("t" * 255, column=COL, row_id="pay_" + "0" * 32)  # proto max_len 255
    assert len(stored) <= 512  # payments.method_token is String(512)


def test_parse_keys_accepts_standard_and_urlsafe_base64_padded_or_not() -> None:
    urlsafe = base64.urlsafe_b64encode(K2).decode().rstrip("=")
    keys = parse_keys(f" new:{urlsafe} , old:{b64(K1)} ,")
    assert [(k.kid, k.key) for k in keys] == [("new", K2), ("old", K1)]
    assert "key=" not in repr(keys[0])  # the key material never shows in a repr


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "holds no key"),
        (" , ", "holds no key"),
        ("nokey", "entry 1 must be kid:base64key"),
        ("k1:", "entry 1 must be kid:base64key"),
        (f"bad kid:{b64(K1)}", "key id"),
        (f"{'k' * 33}:{b64(K1)}", "key id"),
        ("k1:not*base64", "entry 1 ('k1'): is not valid base64"),
        (f"k1:{b64(K1)},k2:{b64(K1[:16])}", "entry 2 ('k2'): key 'k2' is 16 bytes"),
        (f"k1:{b64(K1)},k1:{b64(K2)}", "'k1' appears twice"),
    ],
)
def test_malformed_keys_are_rejected_with_a_clear_message(spec: str, message: str) -> None:
    with pytest.raises(KeyConfigError, match=re.escape(message)) as caught:
        parse_keys(spec)
    assert b64(K1) not in str(caught.value)
    assert b64(K1[:16]) not in str(caught.value)


def _settings(tmp_path: pathlib.Path, **values: object) -> Settings:
    return Settings.from_names({"data_dir": tmp_path / "data", **values})


def test_embedded_default_generates_one_key_in_data_dir(tmp_path: pathlib.Path) -> None:
    first = build_cipher(_settings(tmp_path))
    path = tmp_path / "data" / "encryption_key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.current_kid == "local"
    stored = first.encrypt("tok_x", column=COL, row_id="p")
    again = build_cipher(_settings(tmp_path))  # a restart reuses the file
    assert again.decrypt(stored, column=COL, row_id="p") == "tok_x"
    # moving to managed keys: the generated key keeps reading under its kid `local`
    managed = build_cipher(
        _settings(tmp_path, encryption_keys=f"k2:{b64(K2)},local:{path.read_text()}")
    )
    assert managed.decrypt(stored, column=COL, row_id="p") == "tok_x"


def test_configured_keys_are_used_and_malformed_ones_refused(tmp_path: pathlib.Path) -> None:
    c = build_cipher(_settings(tmp_path, encryption_keys=f"k2:{b64(K2)},k1:{b64(K1)}"))
    assert c.current_kid == "k2"
    assert c.kids == ("k2", "k1")
    assert not (tmp_path / "data" / "encryption_key").exists()
    with pytest.raises(KeyConfigError, match="ENCRYPTION_KEYS entry 1"):
        build_cipher(_settings(tmp_path, encryption_keys="k2:short"))
