"""Scan what a user publishes: one safetensors file or a checkpoint directory.

Every ``*.safetensors`` file is parsed strictly; every other file is an opaque
blob. Sharded checkpoints' ``*.safetensors.index.json`` files are checked
against the shards they name.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import stat
from dataclasses import dataclass

from ..errors import (
    CheckpointNotFoundError,
    DuplicateTensorError,
    FormatError,
    IndexMismatchError,
    UnsafeLinkError,
    UnsafePathError,
)
from .safetensors import SafetensorsHeader, read_header

__all__ = [
    "INDEX_SUFFIX",
    "MAX_PATH_CHARS",
    "SAFETENSORS_SUFFIX",
    "SourceFile",
    "check_relpath",
    "scan_path",
]

SAFETENSORS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
MAX_PATH_CHARS = 4096
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class SourceFile:
    """One file of a checkpoint, ``path`` relative to its root in POSIX form."""

    path: str
    size: int
    header: SafetensorsHeader | None
    abs_path: str | None = None

    @property
    def kind(self) -> str:
        """``"safetensors"`` for parsed tensor files, else ``"blob"``."""
        return "safetensors" if self.header is not None else "blob"


def check_relpath(path: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path, else raise."""
    if not isinstance(path, str):
        raise UnsafePathError(repr(path), "not a string")
    problem = _relpath_problem(path)
    if problem:
        raise UnsafePathError(path, problem)
    return path


def _relpath_problem(path: str) -> str:
    if not path:
        return "empty"
    if len(path) > MAX_PATH_CHARS:
        return f"longer than {MAX_PATH_CHARS} characters"
    if path.startswith("/"):
        return "absolute"
    if "\\" in path:
        return "contains a backslash"
    if "\0" in path:
        return "contains a NUL character"
    if _DRIVE.match(path):
        return "starts with a drive letter"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "has an empty, '.' or '..' component"
    return ""


def _is_safetensors(name: str) -> bool:
    return name.endswith(SAFETENSORS_SUFFIX)


def _source_file(rel: str, real: str, size: int) -> SourceFile:
    header = read_header(real) if _is_safetensors(rel) else None
    return SourceFile(rel, size, header, real)


def _scan_file(path: str) -> tuple[str, list[SourceFile]]:
    name = os.path.basename(path)
    if not _is_safetensors(name):
        raise FormatError(
            f"{path}: publish a {SAFETENSORS_SUFFIX} file or a checkpoint directory"
        )
    real = os.path.abspath(path)
    return "file", [_source_file(check_relpath(name), real, os.stat(real).st_size)]


def _follow_link(root: str, link: str, rel: str) -> tuple[str, os.stat_result]:
    """Resolve a symlink that must point at a regular file inside ``root``."""
    target = os.path.realpath(link)
    if os.path.commonpath([root, target]) != root:
        raise UnsafeLinkError(rel, target, "points outside the checkpoint")
    try:
        st = os.stat(target)
    except OSError as exc:
        raise UnsafeLinkError(rel, target, f"cannot be followed: {exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeLinkError(rel, target, "does not point at a regular file")
    return target, st


def _walk(root: str, folder: str, prefix: str, out: list[SourceFile]) -> None:
    with os.scandir(folder) as entries:
        for entry in entries:
            rel = check_relpath(prefix + entry.name)
            if entry.is_symlink():
                real, st = _follow_link(root, entry.path, rel)
                out.append(_source_file(rel, real, st.st_size))
            elif entry.is_dir(follow_symlinks=False):
                _walk(root, entry.path, rel + "/", out)
            elif entry.is_file(follow_symlinks=False):
                size = entry.stat(follow_symlinks=False).st_size
                out.append(_source_file(rel, os.path.abspath(entry.path), size))
            else:
                raise FormatError(f"{rel}: not a regular file, directory or symlink")


def _check_duplicates(files: list[SourceFile]) -> None:
    """Tensor names must be unique among the safetensors files of one folder."""
    seen: dict[tuple[str, str], str] = {}
    for f in files:
        if f.header is None:
            continue
        folder = posixpath.dirname(f.path)
        for info in f.header.tensors:
            other = seen.setdefault((folder, info.name), f.path)
            if other != f.path:
                raise DuplicateTensorError(info.name, (other, f.path))


def _load_index(f: SourceFile) -> dict[str, object]:
    try:
        with open(f.abs_path or f.path, "rb") as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as exc:
        raise FormatError(f"{f.path}: cannot read index: {exc}") from exc
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise FormatError(f"{f.path}: index has no 'weight_map' object")
    return weight_map


def _check_index(f: SourceFile, by_path: dict[str, SourceFile]) -> None:
    folder = posixpath.dirname(f.path)
    for tensor, target in _load_index(f).items():
        if not isinstance(target, str):
            raise IndexMismatchError(tensor, repr(target), "file name is not a string")
        rel = posixpath.join(folder, target) if folder else target
        if _relpath_problem(rel):
            raise IndexMismatchError(tensor, target, "unsafe file path")
        shard = by_path.get(rel)
        if shard is None or shard.header is None:
            raise IndexMismatchError(
                tensor, target, "no such safetensors file in the checkpoint"
            )
        if tensor not in shard.header.by_name:
            raise IndexMismatchError(tensor, target, "the file has no such tensor")


def _scan_dir(path: str) -> tuple[str, list[SourceFile]]:
    root = os.path.realpath(path)
    files: list[SourceFile] = []
    _walk(root, root, "", files)
    if not files:
        raise FormatError(f"{path}: directory holds no files")
    files.sort(key=lambda f: f.path)
    _check_duplicates(files)
    by_path = {f.path: f for f in files}
    for f in files:
        if f.path.endswith(INDEX_SUFFIX):
            _check_index(f, by_path)
    return "dir", files


def scan_path(path: str | os.PathLike[str]) -> tuple[str, list[SourceFile]]:
    """Return ``("file" | "dir", files)`` for a safetensors file or a directory.

    Directories are walked recursively (hidden files included, sorted by
    relative path); symlinks are followed only to regular files inside it.
    """
    source = os.fspath(path)
    try:
        st = os.stat(source)
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(source) from exc
    if stat.S_ISDIR(st.st_mode):
        return _scan_dir(source)
    if stat.S_ISREG(st.st_mode):
        return _scan_file(source)
    raise FormatError(f"{source}: not a regular file or directory")
