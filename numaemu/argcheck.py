"""Argument checks: what the kernel's C types can hold, and which errno says it does not.

A Linux call receives 64-bit registers and C arrays; Python hands over unbounded
ints, floats, bools, strings and arbitrary objects.  Every public ``Task`` method
passes its arguments through these helpers before it sends anything, so that a
value no kernel type can hold fails with ``NumaError`` (never ``OverflowError``,
``TypeError`` or ``ValueError``) and nothing changes.  The coordinator applies the
same name rules again (it never trusts the client library) and the wire schema
(``numaemu.protocol``) the same integer ranges.

======================  =================================================================
argument                rule (errno)
======================  =================================================================
any integer             an ``int`` or numpy integer; a bool or a float is not one (EINVAL)
mode, flags, pid,       must fit a signed 64-bit register (EINVAL)
sysctl value
address                 must fit a pointer, ``-2**63 .. 2**64-1``; a negative one reads as
                        its two's complement, as in C (EINVAL otherwise)
length                  ``0 .. 2**64-1`` (EINVAL); a larger one is a range beyond the
                        address space, which each call answers as Linux does for a range
                        that wraps (mmap: ENOMEM, read/write: EFAULT, others: EINVAL)
nodemask (node list)    an iterable of node numbers, else EFAULT (an unreadable mask);
                        a node outside ``0..MAX_NUMNODES-1`` or more than MAX_NUMNODES
                        entries EINVAL (the kernel's nodemask has MAX_NUMNODES bits)
move_pages ``pages``    an iterable of addresses, else EFAULT (an unreadable array)
move_pages ``nodes``    an iterable of integers, else EFAULT; an integer no node can have
                        is ENODEV when its batch comes, as in Linux
CPU list                an iterable of CPU numbers, else EFAULT; more than CPU_SETSIZE
                        entries or a number outside ``0..CPU_SETSIZE-1`` EINVAL
shared-object name      a str of 1..NAME_MAX bytes (UTF-8), ENAMETOOLONG beyond; '/',
                        NUL, "." and ".." EINVAL (shm_open(3), the kernel's path lookup)
file path               str, bytes or os.PathLike; NUL EINVAL; PATH_MAX bytes or more, or
                        a component over NAME_MAX bytes, ENAMETOOLONG
======================  =================================================================
"""

from __future__ import annotations

import errno
import math
import os
from itertools import islice
from numbers import Integral, Real
from typing import Any

import numpy as np

from .constants import CPU_SETSIZE, MAX_NUMNODES, NAME_MAX, PATH_MAX
from .errors import NumaError

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1
#: Largest delay-injection dilation: 1e6 already turns a 100 ns access into 0.1 s.
MAX_DILATION = 1e6

#: Sent in place of a node list the caller's object could not be read as: the coordinator
#: reports EFAULT at the point where the kernel copies the nodemask, after checking the mode.
UNREADABLE_NODES = "unreadable nodemask"


def _short(value: Any) -> str:
    """``repr`` cut to a length fit for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def integer(name: str, value: Any) -> int:
    """``value`` as an int: an ``int`` or numpy integer, not a bool; else EINVAL."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Integral):
        raise NumaError(errno.EINVAL, f"{name} must be an integer, not {type(value).__name__}")
    return int(value)


def signed(name: str, value: Any) -> int:
    """A signed 64-bit argument (mode, flags, pid); EINVAL if it does not fit."""
    value = integer(name, value)
    if not INT64_MIN <= value <= INT64_MAX:
        raise NumaError(errno.EINVAL, f"{name} {value} does not fit in 64 bits")
    return value


def optional_pid(value: Any) -> int | None:
    """A pid argument: None (the caller) or a signed 64-bit integer."""
    return None if value is None else signed("pid", value)


def address(name: str, value: Any) -> int:
    """An address as the unsigned long the kernel sees; EINVAL if no pointer holds it."""
    value = integer(name, value)
    if not INT64_MIN <= value <= UINT64_MAX:
        raise NumaError(errno.EINVAL, f"{name} {value:#x} does not fit in a 64-bit pointer")
    return value & UINT64_MAX


def length(name: str, value: Any, too_big: int = errno.EINVAL) -> int:
    """A size_t: negative is EINVAL, beyond 64 bits ``too_big`` (the call's errno for a
    range larger than the address space)."""
    value = integer(name, value)
    if value < 0:
        raise NumaError(errno.EINVAL, f"negative {name} {value}")
    if value > UINT64_MAX:
        raise NumaError(too_big, f"{name} {value:#x} is larger than the address space")
    return value


def flag(name: str, value: Any) -> bool:
    """A yes/no argument: a bool (or numpy bool), else EINVAL."""
    if not isinstance(value, (bool, np.bool_)):
        raise NumaError(errno.EINVAL, f"{name} must be True or False, not {_short(value)}")
    return bool(value)


def _items(value: Any, limit: int) -> list | None:
    """Up to ``limit + 1`` items of an iterable (so a longer or endless one shows), or None
    if ``value`` cannot be iterated."""
    if isinstance(value, (str, bytes, bytearray, memoryview)):
        return None  # characters and bytes are no numbers
    try:
        return list(islice(iter(value), limit + 1))
    except TypeError:
        return None


def _is_int(item: Any) -> bool:
    return isinstance(item, Integral) and not isinstance(item, (bool, np.bool_))


def nodemask(value: Any) -> list[int] | str:
    """Nodes as a plain list of ints, or ``UNREADABLE_NODES`` (EFAULT in the coordinator).

    Node numbers the wire cannot carry are EINVAL here (the kernel: a bit at or above
    MAX_NUMNODES); smaller out-of-range ones go on, for the coordinator to report in the
    kernel's order.
    """
    if value is None:
        return []
    items = _items(value, MAX_NUMNODES)
    if items is None or not all(_is_int(n) for n in items):
        return UNREADABLE_NODES
    if len(items) > MAX_NUMNODES:
        raise NumaError(errno.EINVAL, f"a node list names at most {MAX_NUMNODES} nodes "
                                      "(MAX_NUMNODES)")
    out = [int(n) for n in items]
    for n in out:
        if not INT64_MIN <= n <= INT64_MAX:
            raise NumaError(errno.EINVAL, f"node {n} is outside 0..{MAX_NUMNODES - 1} "
                                          "(MAX_NUMNODES)")
    return out


def addresses(value: Any) -> np.ndarray:
    """move_pages ``pages``: addresses as a uint64 array; EFAULT if the array cannot be read
    as one (something that is no address, or a number no pointer holds)."""
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu":
        return value.astype(np.uint64)  # negative ones wrap, as C's pointers would
    items = _items(value, 1 << 62)
    if items is None:
        raise NumaError(errno.EFAULT, f"cannot read the pages array {_short(value)}")
    out = []
    for i, a in enumerate(items):
        if not _is_int(a) or not INT64_MIN <= a <= UINT64_MAX:
            raise NumaError(errno.EFAULT, f"pages[{i}] = {_short(a)} is not an address")
        out.append(int(a) & UINT64_MAX)
    return np.array(out, dtype=np.uint64)


def target_nodes(value: Any) -> list[int]:
    """move_pages ``nodes``: one int per page; EFAULT if they cannot be read as ints.

    A number no node can have stays invalid but is brought into the wire's range, so that
    the coordinator answers ENODEV when its batch comes (earlier batches still move).
    """
    items = _items(value, 1 << 62)
    if items is None or not all(_is_int(n) for n in items):
        raise NumaError(errno.EFAULT, f"cannot read the nodes array {_short(value)}")
    return [min(max(int(n), -1), MAX_NUMNODES) for n in items]


def cpu_list(value: Any) -> list[int]:
    """sched_setaffinity's CPUs: a CPU number or an iterable of them."""
    if _is_int(value):
        value = [value]
    items = _items(value, CPU_SETSIZE)
    if items is None or not all(_is_int(c) for c in items):
        raise NumaError(errno.EFAULT, f"cannot read the CPU set {_short(value)}")
    if len(items) > CPU_SETSIZE:
        raise NumaError(errno.EINVAL, f"a CPU set names at most {CPU_SETSIZE} CPUs")
    out = [int(c) for c in items]
    for c in out:
        if not 0 <= c < CPU_SETSIZE:
            raise NumaError(errno.EINVAL, f"CPU {c} is outside 0..{CPU_SETSIZE - 1}")
    return out


def _utf8(what: str, text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise NumaError(errno.EINVAL, f"{what} {_short(text)} is not valid text") from None


def shm_name(value: Any) -> str:
    """A shared-object name, as shm_open(3) takes it (without the leading '/')."""
    if not isinstance(value, str):
        raise NumaError(errno.EINVAL, f"a shared-object name is a str, not "
                                      f"{type(value).__name__}")
    if len(_utf8("shared-object name", value)) > NAME_MAX:
        raise NumaError(errno.ENAMETOOLONG, f"shared-object name {_short(value)} is longer "
                                            f"than {NAME_MAX} bytes (NAME_MAX)")
    if not value or value in (".", "..") or "/" in value or "\0" in value:
        raise NumaError(errno.EINVAL, f"bad shared-object name {_short(value)} (a name "
                                      "is one path component: no '/' or NUL)")
    return value


def check_path(path: str) -> str:
    """An absolute file path: NUL is EINVAL, PATH_MAX or NAME_MAX exceeded ENAMETOOLONG."""
    if "\0" in path:
        raise NumaError(errno.EINVAL, f"file path {_short(path)} holds a NUL byte")
    raw = _utf8("file path", path)
    if len(raw) >= PATH_MAX or any(len(part) > NAME_MAX for part in raw.split(b"/")):
        raise NumaError(errno.ENAMETOOLONG, f"file path {_short(path)} is too long "
                                            f"(PATH_MAX {PATH_MAX}, NAME_MAX {NAME_MAX})")
    if not os.path.isabs(path):
        raise NumaError(errno.EINVAL, f"file path {_short(path)} is not absolute")
    return path


def file_path(value: Any) -> str:
    """mmap's ``file``: a str, bytes or os.PathLike, made absolute against our cwd."""
    try:
        path = os.fspath(value)
    except TypeError:
        raise NumaError(errno.EINVAL, f"file must be a path, not {type(value).__name__}") \
            from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if "\0" in path:
        raise NumaError(errno.EINVAL, f"file path {_short(path)} holds a NUL byte")
    return check_path(os.path.abspath(path))


def text(name: str, value: Any, limit: int) -> str:
    """A name sent as text (a sysctl name): a str that travels as UTF-8, else EINVAL;
    longer than ``limit`` characters ENOENT (nothing has such a name)."""
    if not isinstance(value, str):
        raise NumaError(errno.EINVAL, f"{name} must be a str, not {type(value).__name__}")
    _utf8(name, value)
    if len(value) > limit:
        raise NumaError(errno.ENOENT, f"no {name} {_short(value)}")
    return value


def dilation(value: Any) -> float | None:
    """A delay-injection dilation: None or 0 (off), or a finite number in (0, MAX_DILATION]."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
        raise NumaError(errno.EINVAL, f"dilation must be a number, not {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not (math.isfinite(number) and 0 <= number <= MAX_DILATION):
        raise NumaError(errno.EINVAL, f"dilation {_short(value)} is not in 0..{MAX_DILATION:g}")
    return number or None
