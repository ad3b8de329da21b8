"""What a path a user gives really is, checked before any work: one line naming the key and the problem.

`kind(path)` tells a file from a folder, a named pipe, a socket, a device, a dangling symbolic link, a link loop
and a missing path, without opening anything (opening a pipe would block until a writer comes). The checks
below refuse, up front, what would otherwise fail late (a name longer than the file system allows, found when
the run directory is created; a link loop, found when the first file is written) or silently (an empty path,
read as the current directory)."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

from fl_ietagc.settings.errors import ConfigError

NAME_MAX_FALLBACK, PATH_MAX_FALLBACK = 255, 4096


def kind(path: str | Path) -> str:
    """file | directory | named pipe (FIFO) | socket | device | dangling symbolic link (to T) | symbolic link loop
    | missing | not accessible (E)."""
    p = os.fspath(path)
    try:
        mode = os.stat(p).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link loop"
        if e.errno == errno.ENOENT and os.path.islink(p):
            return f"a dangling symbolic link (to {os.readlink(p)}, which does not exist)"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return "missing"
        if e.errno == errno.ENAMETOOLONG:
            return "a name longer than the file system allows"
        return f"not accessible ({e.strerror})"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"


def described(what: str) -> str:
    """kind()'s answer as a phrase: "a file", "a folder", "a named pipe (FIFO)", ..."""
    return {"file": "a file", "directory": "a folder"}.get(what, what)


def _limits(existing: Path) -> tuple[int, int]:
    try:
        return os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        return NAME_MAX_FALLBACK, PATH_MAX_FALLBACK


def nearest_existing(path: Path) -> Path:
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    return probe


def check_name_lengths(key: str, value: str, path: Path) -> None:
    """Every component within NAME_MAX bytes, the whole within PATH_MAX, on the file system that would hold it."""
    name_max, path_max = _limits(nearest_existing(path.absolute()))
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            raise ConfigError(
                f"{key} = {value!r}: the name {part[:40]}... is {len(os.fsencode(part))} bytes; the "
                f"file system allows at most {name_max}"
            )
    if len(os.fsencode(str(path.absolute()))) >= path_max:
        raise ConfigError(
            f"{key} = {value!r}: the path is {len(os.fsencode(str(path.absolute())))} bytes; the "
            f"file system allows at most {path_max - 1}"
        )


def check_dir_to_create(key: str, value: str) -> Path:
    """A folder that exists or can be created (nothing is created here): not empty, names within the file system's
    limits, and every existing part of it a folder (not a file, pipe, dangling link or link loop), writable."""
    if not value.strip():
        raise ConfigError(f"{key} = {value!r}: empty; give a directory")
    path = Path(value).expanduser()
    check_name_lengths(key, value, path)
    probe = Path(path.anchor) if path.anchor else Path(".")
    for part in path.parts[1 if path.anchor else 0 :]:  # top down: the first part that is not a folder is named
        what = kind(probe / part)
        if what == "missing":
            break
        probe = probe / part
        if what != "directory":
            shown = "" if probe == path else f"{probe} is "
            raise ConfigError(f"{key} = {value!r}: {shown}{described(what)}, not a directory")
    try:  # (a probe file, gone at once: os.access would not see a read-only mount)
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ConfigError(f"{key} = {value!r}: cannot write in {probe} ({e.strerror or e})") from None
    return path


def check_existing(key: str, value: str, want: tuple[str, ...] = ("file",)) -> Path:
    """An existing path of one of the kinds in `want` ("file", "directory"); else one line saying what it is."""
    if not value.strip():
        raise ConfigError(f"{key} = {value!r}: empty; give a path")
    path = Path(value).expanduser()
    check_name_lengths(key, value, path)
    what = kind(path)
    if what in want:
        return path
    if what == "missing":
        raise ConfigError(f"{key} = {value!r}: no such file or directory (relative to {os.getcwd()})")
    wanted = " or ".join("a folder" if w == "directory" else "a file" for w in want)
    raise ConfigError(f"{key} = {value!r}: {described(what)}; expected {wanted}")
