"""An output directory that is replaced whole or not at all.

:func:`atomic_directory` hands out a new, empty directory beside the target,
on the same filesystem, named ``.<name>.mergekit-nan-partial-<random>``.
Everything is written there. Only when the block completes is it moved into
place with one ``rename`` (the target did not exist or was empty) or one
atomic exchange (``renameat2(RENAME_EXCHANGE)``, the target held an earlier
model and ``overwrite`` was given), after which the earlier content, now in
the partial directory, is deleted. If the block fails or is interrupted, the
partial directory is deleted and the target is untouched; if the process is
killed, the target still holds exactly what it held before and the partial
directory is left behind under its recognisable name
(:func:`leftovers` finds it).

Where the filesystem cannot exchange two directories atomically, the
earlier target is first renamed aside (``.<name>.mergekit-nan-old-<random>``)
and the new one renamed into place: between the two renames the target is
briefly absent, never a mix.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, List, Mapping, Optional, Tuple

__all__ = ["PARTIAL", "OutputNotEmpty", "atomic_directory", "leftovers", "write_files"]

PARTIAL = ".mergekit-nan-partial-"
"""The mark in the name of a directory a merge is still writing (or left behind when killed)."""

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class OutputNotEmpty(FileExistsError):
    """The output directory already holds something and ``overwrite`` was not given."""


def _partial_prefix(target: Path) -> str:
    return f".{target.name}{PARTIAL}"


def leftovers(target: Path) -> List[Path]:
    """Partial directories of earlier merges into ``target`` that never finished."""
    parent = target.parent
    if not parent.is_dir():
        return []
    prefix = _partial_prefix(target)
    return sorted(p for p in parent.iterdir() if p.name.startswith(prefix) and p.is_dir())


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically; False where the system or filesystem cannot."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _replace(partial: Path, target: Path) -> None:
    """Put ``partial`` at ``target``; the earlier ``target`` (if any) ends up deleted."""
    if not target.exists():
        os.rename(partial, target)
        return
    if not any(target.iterdir()):
        os.rename(partial, target)  # an empty directory is replaced atomically
        return
    if _exchange(partial, target):
        shutil.rmtree(partial)  # now the earlier content
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.mergekit-nan-old-", dir=target.parent))
    os.rename(target, aside / target.name)
    try:
        os.rename(partial, target)
    except BaseException:
        os.rename(aside / target.name, target)
        raise
    shutil.rmtree(aside)


def _missing_parents(target: Path) -> List[Path]:
    missing = []
    parent = target.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    return missing


@contextlib.contextmanager
def atomic_directory(target: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a partial directory to write into; on success it becomes ``target``.

    ``target`` may not exist yet (missing parents are created, and removed
    again if the block fails), may be empty, or, with ``overwrite``, may hold
    anything, which is replaced only once the block has completed. Raises
    :class:`OutputNotEmpty` for a non-empty ``target`` without ``overwrite``
    and ``NotADirectoryError`` when it is a file.
    """
    target = Path(os.path.realpath(os.path.expanduser(target)))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"output {target} exists and is not a directory")
    if target.is_dir() and not overwrite and any(target.iterdir()):
        raise OutputNotEmpty(
            f"output directory {target} is not empty; pass --overwrite to replace it "
            "(its content stays until the new model is complete)"
        )
    created = _missing_parents(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial: Optional[Path] = Path(
        tempfile.mkdtemp(prefix=_partial_prefix(target), dir=target.parent)
    )
    try:
        yield partial
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o777 & ~umask)  # mkdtemp's directory is private
        _replace(partial, target)
        partial = None
    finally:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
            for parent in created:
                with contextlib.suppress(OSError):
                    parent.rmdir()


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_files(outputs: Mapping[str, Callable[[str], None]]) -> None:
    """Call every ``{path: write}`` on a temporary file, then rename them all.

    Nothing is renamed unless every writer succeeded; temporary files are
    removed on failure. Files get the usual permissions (umask applied).
    """
    staged: List[Tuple[str, str]] = []
    try:
        for path, write in outputs.items():
            directory = os.path.dirname(os.path.abspath(path))
            suffix = os.path.splitext(path)[1]
            handle, temporary = tempfile.mkstemp(
                prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=directory
            )
            os.close(handle)
            staged.append((temporary, path))
            write(temporary)
            os.chmod(temporary, _default_mode())
    except BaseException:
        for temporary, _ in staged:
            if os.path.exists(temporary):
                os.unlink(temporary)
        raise
    for temporary, path in staged:
        os.replace(temporary, path)
