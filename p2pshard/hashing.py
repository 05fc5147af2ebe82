"""Shard ids, DHT keys and model names.

A shard id is the blake3 digest of its bytes, written as 64 lowercase hex
characters. DHT keys live in kademlia's 160-bit space and are derived with a
domain prefix, so a shard key and a name key can never collide.
"""

from __future__ import annotations

import re

import blake3

from .errors import InvalidIdError, InvalidNameError

__all__ = [
    "ID_PATTERN",
    "KEY_BYTES",
    "Hasher",
    "check_id",
    "check_name",
    "hash_bytes",
    "name_key",
    "shard_key",
]

ID_PATTERN = re.compile(r"[0-9a-f]{64}")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,199}")
KEY_BYTES = 20  # kademlia's routing table spans 2**160 ids

Hasher = blake3.blake3


def hash_bytes(data: bytes | bytearray | memoryview) -> str:
    """The shard id of ``data``; large inputs are hashed without the GIL."""
    hasher = blake3.blake3(max_threads=1)
    hasher.update(data)
    return hasher.hexdigest()


def check_id(shard_id: object) -> str:
    """Return ``shard_id`` if it is a well-formed id, else raise InvalidIdError."""
    if not isinstance(shard_id, str) or not ID_PATTERN.fullmatch(shard_id):
        raise InvalidIdError(f"invalid shard id {shard_id!r}")
    return shard_id


def check_name(name: object) -> str:
    """Return ``name`` if it is a valid model name, else raise InvalidNameError."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise InvalidNameError(
            f"invalid model name {shown}: use 1-200 characters from "
            "letters, digits and ._/:@+- starting with a letter or digit"
        )
    return name


def _derive(prefix: bytes, payload: bytes) -> bytes:
    return blake3.blake3(prefix + payload).digest(length=KEY_BYTES)


def shard_key(shard_id: str) -> bytes:
    """The 160-bit DHT key that decides which peers own a shard."""
    return _derive(b"p2pshard/shard/", bytes.fromhex(check_id(shard_id)))


def name_key(name: str) -> bytes:
    """The 160-bit DHT key under which a model name's record is stored."""
    return _derive(b"p2pshard/name/", check_name(name).encode())
