"""The node process: one per emulated NUMA node.

A node owns its frames (one /dev/shm segment), the frame allocator, the
node's numastat counters and its LRU state, and answers the coordinator.  See
``nodes.node`` for the service loop and ``nodes.segment`` for the memory.
"""

from .node import FrameAllocator, Node, serve
from .segment import Segment, cluster_segments, segment_path

__all__ = ["FrameAllocator", "Node", "Segment", "cluster_segments", "segment_path", "serve",
           "run_node"]


def run_node(node: int, coordinator: str, cluster_id: str, frames: int, page_size: int,
             data_endpoint: str, keys: str | None = None, data_path: str = "auto") -> None:
    """Create the node's segment and serve until stopped; the segment is removed on exit.
    ``data_path`` "remote": copy from other nodes through their data services only."""
    segment = Segment(segment_path(cluster_id, node), frames, page_size, create=True)
    serve(node, coordinator, segment, data_endpoint, keys, data_path)
