"""A node's frames: one file in /dev/shm, mapped with mmap and pre-faulted.

Not ``multiprocessing.shared_memory``: on Python 3.11 its resource tracker
unlinks a segment when a process that merely attached to it exits
(reference/python-ipc-measurements.md section 5).  The node that creates a
segment removes it when it stops; the launcher sweeps leftovers by name.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

SHM_DIR = "/dev/shm"
PREFIX = "numaemu-"
MADV_POPULATE_WRITE = 23  # Linux 5.14+; Python 3.11 has no constant for it


def segment_path(cluster_id: str, node: int) -> str:
    """Where node ``node`` of cluster ``cluster_id`` keeps its frames."""
    return os.path.join(SHM_DIR, f"{PREFIX}{cluster_id}-node{node}")


def cluster_segments(cluster_id: str) -> list[str]:
    """Every segment of a cluster that is still in /dev/shm."""
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    prefix = f"{PREFIX}{cluster_id}-"
    return [os.path.join(SHM_DIR, n) for n in names if n.startswith(prefix)]


class Segment:
    """A shared-memory file of ``frames`` page-size slots, viewed as a 2-D uint8 array."""

    def __init__(self, path: str, frames: int, page_size: int, *, create: bool) -> None:
        self.path = path
        self.frames = frames
        self.page_size = page_size
        self.size = frames * page_size
        self.owner = create
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                # A memoryless node still maps one page: mmap refuses an empty mapping.
                os.ftruncate(fd, max(self.size, page_size))
            elif os.fstat(fd).st_size < self.size:
                raise ValueError(f"{path} is smaller than {self.size} bytes")
            self.map = mmap.mmap(fd, max(self.size, page_size))
        finally:
            os.close(fd)
        if create:
            self._prefault()
        self.array = np.frombuffer(self.map, dtype=np.uint8, count=self.size).reshape(
            frames, page_size
        )

    def _prefault(self) -> None:
        """Populate every page now: a first write to a fresh shared page costs ~3 us."""
        if self.size == 0:
            return
        try:
            self.map.madvise(MADV_POPULATE_WRITE)
        except (OSError, ValueError):
            view = np.frombuffer(self.map, dtype=np.uint8, count=self.size)
            view[:: mmap.PAGESIZE] = 0
            del view

    def close(self) -> None:
        """Unmap; the owner also removes the file."""
        self.array = None
        try:
            self.map.close()
        except BufferError:
            pass  # a view is still exported; the mapping goes away with the process
        if self.owner:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def _consecutive(pfns: np.ndarray) -> bool:
    if len(pfns) == 1:
        return True
    first = int(pfns[0])
    return int(pfns[-1]) - first == len(pfns) - 1 and not np.count_nonzero(np.diff(pfns) != 1)


def load_frames(frames: np.ndarray, pfns: np.ndarray, offset: int = 0,
                length: int = -1) -> bytes:
    """Bytes ``[offset, offset + length)`` of the frames ``pfns`` (rows of ``frames``) taken
    as one byte string (``length`` -1: to the end); the caller checked the bounds."""
    n = len(pfns)
    if length < 0:
        length = n * frames.shape[1] - offset
    if n == 0 or length == 0:
        return b""
    if _consecutive(pfns):  # one slice of the segment
        first = int(pfns[0])
        return frames[first : first + n].reshape(-1)[offset : offset + length].tobytes()
    return frames[pfns].reshape(-1)[offset : offset + length].tobytes()


def store_frames(frames: np.ndarray, pfns: np.ndarray, offset: int, data) -> None:
    """Store ``data`` into the frames ``pfns`` taken as one byte string, from byte ``offset``
    of the first frame, in frame order; bytes outside that range keep their contents.  The
    caller checked that ``offset`` is inside the first frame and the data ends in the last."""
    src = np.frombuffer(data, dtype=np.uint8)
    n, ps = len(pfns), frames.shape[1]
    if n == 0:
        return
    first = int(pfns[0])
    if _consecutive(pfns):
        frames[first : first + n].reshape(-1)[offset : offset + len(src)] = src
        return
    head = ps - offset
    frames[first, offset:] = src[:head]
    if n > 2:
        frames[pfns[1:-1]] = src[head : head + (n - 2) * ps].reshape(-1, ps)
    tail = offset + len(src) - (n - 1) * ps
    frames[int(pfns[-1]), :tail] = src[len(src) - tail :]
