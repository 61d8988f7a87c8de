"""Errors raised by numaemu.

``NumaError`` is what a failing Linux call returns as ``-1`` with ``errno`` set;
``ClusterError`` means the cluster itself is gone or unreachable.
"""

from __future__ import annotations

import errno as _errno
import os


class NumaError(OSError):
    """A whole-call failure with a Linux errno (``.errno``) and a message saying what was wrong."""

    def __init__(self, err: int, message: str | None = None) -> None:
        super().__init__(err, message or os.strerror(err))

    def __reduce__(self):  # keep errno and message across pickling (spawned clients)
        return (type(self), (self.errno, self.strerror))

    @property
    def errname(self) -> str:
        """The symbolic errno name, e.g. ``"EINVAL"``."""
        return _errno.errorcode.get(self.errno, str(self.errno))


class ClusterError(RuntimeError):
    """The cluster (its coordinator or a node) is gone, not answering, or cannot be started."""


class NodeUnreachable(ClusterError):
    """Node ``node``'s data service did not serve an access (it went away, refused, or did
    not answer in time).  An access path that meets it asks the coordinator about those
    pages again: a dead node's pages are poisoned (EIO), as on the mapped path."""

    def __init__(self, node: int, message: str) -> None:
        super().__init__(message)
        self.node = node

    def __reduce__(self):
        return (type(self), (self.node, str(self)))
