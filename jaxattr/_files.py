"""Opening input files safely: regular files only, JSON and .npy read within bounds, and names that
always print on one line."""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import sys
from typing import BinaryIO

import numpy as np

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


def open_regular_file(path: str | os.PathLike, *, follow_symlinks: bool = True) -> BinaryIO:
    """`path` opened for binary reading; NotARegularFileError unless it is a regular file (nor,
    with follow_symlinks=False, a symbolic link).

    The type is checked before opening (opening a socket fails, a device may have effects), the
    open is non-blocking, so a FIFO put in place after the check cannot hang it, and the type is
    checked again on the open descriptor, so the file read is the file checked."""
    mode = os.stat(path, follow_symlinks=follow_symlinks).st_mode
    if stat.S_ISLNK(mode):
        raise NotARegularFileError("a symbolic link, not a regular file")
    if not stat.S_ISREG(mode):
        raise NotARegularFileError(f"{file_kind(mode)}, not a regular file")
    no_follow = 0 if follow_symlinks else getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | no_follow | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == errno.ELOOP and not follow_symlinks:  # replaced by a link after the check
            raise NotARegularFileError("a symbolic link, not a regular file") from None
        raise
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


def read_json(path: str | os.PathLike, limit: int) -> object:
    """The JSON document in `path`, a regular file of at most `limit` bytes; ValueError if it is
    larger, not JSON, or nested deeper than the parser's recursion limit (which it reports as a
    RecursionError: a hostile file must not end the program)."""
    with open_regular_file(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def load_array(path: str | os.PathLike, limit: int) -> np.ndarray:
    """The array in a .npy file, read only once its header proves sound: a numeric dtype, no
    empty axis, data of at most `limit` bytes, and a file exactly as long as the header says (a
    header claiming 100000x100000 must not allocate 120 GB). ValueError otherwise."""
    with open_regular_file(path) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        if dtype.hasobject or dtype.kind not in "biuf":
            raise ValueError(f"holds {dtype}, not numbers")
        if 0 in shape:
            raise ValueError(f"holds an empty array of shape {shape}")
        size = math.prod(shape) * dtype.itemsize
        if size > limit:
            raise ValueError(f"its header claims shape {shape}: {size} bytes, more than the {limit} allowed")
        if os.fstat(f.fileno()).st_size - f.tell() != size:
            raise ValueError(f"truncated or padded: its header claims shape {shape} of {dtype}")
        f.seek(0)
        return np.lib.format.read_array(f, allow_pickle=False)
