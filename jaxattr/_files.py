"""Opening input files safely: regular files only, and names that always print on one line."""

from __future__ import annotations

import os
import stat
import sys
from typing import BinaryIO

_FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


class NotARegularFileError(OSError):
    """The path names a directory, FIFO, socket or device: nothing jaxattr reads as a file."""


def file_kind(mode: int) -> str:
    """What a file of `st_mode` is, for messages ("a regular file", "a FIFO (named pipe)", ...)."""
    return _FILE_KINDS.get(stat.S_IFMT(mode), "a regular file" if stat.S_ISREG(mode) else "a special file")


def open_regular_file(path: str | os.PathLike) -> BinaryIO:
    """`path` opened for binary reading; NotARegularFileError unless it is a regular file.

    The type is checked before opening (opening a socket fails, a device may have effects), the
    open is non-blocking, so a FIFO put in place after the check cannot hang it, and the type is
    checked again on the open descriptor, so the file read is the file checked."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotARegularFileError(f"{file_kind(mode)}, not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFileError(f"{file_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def display_path(path: str | os.PathLike) -> str:
    """`path` as one printable line: bytes that are not valid in the file system's encoding
    shown as \\xNN escapes, control characters (a newline in a name) as escapes too."""
    text = os.fsencode(path).decode(sys.getfilesystemencoding(), "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def one_line(text: object) -> str:
    """`text` with runs of whitespace (newlines included) collapsed to single spaces."""
    return " ".join(str(text).split())
