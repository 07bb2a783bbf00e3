"""Reading and writing the files a user names: bounded reads, atomic writes, and only ever regular files.

Paths reach kfac-tune from the command line, from model YAMLs and from shared recipe directories, so neither
end may trust what sits at a path:

* :func:`read_text` opens without blocking and refuses anything but a regular file (a FIFO named ``x.yaml`` would
  hang the reader, ``/dev/zero`` would fill memory) and anything over a size limit.
* :func:`write_atomic` writes a temp file beside the target and renames it over: a reader never sees half a file,
  and a failure leaves the previous file as it was. It writes only regular files: a symlink is resolved and
  written through (said on stderr), a device, FIFO, socket or directory is refused, so ``-o /dev/null`` as root
  cannot turn ``/dev/null`` into a file. The previous file's mode (and, where allowed, owner) is kept; a new file
  gets the umask's mode, like any file a shell creates. The temp file is named ``.<name>.tmp-<pid>``: removed on
  any exception (Ctrl-C included), and one left by a process killed between ``fsync`` and ``rename`` is removed
  by the next write once that process is gone.
"""
from __future__ import annotations

import contextlib
import os
import stat
import sys
from pathlib import Path

MAX_YAML_BYTES = 1 << 20  # a recipe or model YAML is a few KiB; a megabyte is a mistake, not a config
TEMP_MARK = ".tmp-"


class FileError(ValueError):
    """A path that must not be read or written (not a regular file, too large); the message says which and why."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


# ------------------------------------------------------------------------------------------------ reading
def read_text(path: str | Path, limit: int = MAX_YAML_BYTES) -> str:
    """The UTF-8 text of the regular file ``path`` (symlinks followed), at most ``limit`` bytes.

    Raises ``FileError`` for a special file or a file over ``limit``, ``OSError`` when it cannot be opened or read,
    ``UnicodeDecodeError`` for binary content.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))  # a FIFO opens without a writer
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileError(f"{path} is {_kind(info.st_mode)}, not a regular file; expected a YAML file")
        too_big = FileError(f"{path} is larger than {limit:,} bytes; expected a YAML file of at most {limit:,} "
                            f"bytes (is this the right file?)")
        if info.st_size > limit:
            raise too_big
        chunks, size = [], 0
        while chunk := os.read(fd, min(65536, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:  # the file grew while being read
                raise too_big
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8")


# ------------------------------------------------------------------------------------------------ writing
def writable_target(path: str | Path) -> Path:
    """Where a write to ``path`` lands: ``path`` itself, or the file a symlink there points to.

    Raises ``FileError`` when that is not a regular file (or nothing yet): a directory, device, FIFO or socket,
    or a symlink loop.
    """
    path = Path(path)
    target = path
    if path.is_symlink():
        try:
            target = path.resolve(strict=False)
        except (RuntimeError, OSError) as error:  # a symlink loop
            raise FileError(f"cannot write {path}: it is a symbolic link that cannot be resolved ({error})") from None
    try:
        info = target.lstat()
    except FileNotFoundError:
        return target
    except OSError as error:
        raise FileError(f"cannot write {path} ({error.strerror or error})") from None
    if not stat.S_ISREG(info.st_mode):
        via = f" (the symbolic link {path} points to {target})" if target != path else ""
        raise FileError(f"refusing to write {target}{via}: it is {_kind(info.st_mode)}, not a regular file; "
                        f"choose a file path")
    return target


def check_writable_directory(directory: str | Path) -> Path:
    """Create ``directory`` if needed and prove that a file can be created in it, before hours of work whose
    result would go there. Raises ``FileError`` naming the reason."""
    directory = Path(directory)
    probe = directory / f".kfac-tune-probe{TEMP_MARK}{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not directory.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise FileError(f"cannot write into {directory} ({error.strerror or error}); choose a writable "
                        f"directory") from None
    return directory


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path written (a symlink's target).

    Raises ``FileError`` for a target that is not a regular file and ``OSError`` for a failed write; in both cases
    the previous file, if any, is unchanged and no temp file is left.
    """
    path = Path(path)
    target = writable_target(path)
    if target != path:
        print(f"note: {path} is a symbolic link; writing through to {target}", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    temp = target.with_name(f".{target.name}{TEMP_MARK}{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)  # ours: a previous process with this pid died mid-write
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        try:
            _copy_ownership(fd, target)
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, target)
    except BaseException:  # KeyboardInterrupt included: the temp file must not stay behind
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _sync_directory(target.parent)
    return target


def _copy_ownership(fd: int, target: Path) -> None:
    """The previous file's mode and owner, or the mode the umask gives a new file."""
    try:
        info = target.stat()
    except FileNotFoundError:
        os.fchmod(fd, 0o666 & ~_umask())
        return
    os.fchmod(fd, stat.S_IMODE(info.st_mode))
    if (info.st_uid, info.st_gid) != (os.geteuid(), os.getegid()):
        with contextlib.suppress(PermissionError):  # only root may give a file away
            os.fchown(fd, info.st_uid, info.st_gid)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_stale_temps(target: Path) -> None:
    """Remove ``.<name>.tmp-<pid>`` files beside ``target`` whose writer no longer runs."""
    prefix = f".{target.name}{TEMP_MARK}"
    with contextlib.suppress(OSError):
        for entry in os.scandir(target.parent):
            pid = entry.name[len(prefix):]
            if entry.name.startswith(prefix) and pid.isdigit() and entry.is_file(follow_symlinks=False) \
                    and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _sync_directory(directory: Path) -> None:
    """Make the rename durable (a crash right after it could otherwise lose the new name)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
