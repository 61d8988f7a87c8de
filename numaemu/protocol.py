"""The wire protocol: every message numaemu's processes exchange, in one place.

Messages are msgpack maps carried over ZeroMQ.  A request is
``{"op": <name>, "seq": <int>, <fields>...}``; its reply is
``{"re": <seq>, "ok": True, <fields>...}`` or
``{"re": <seq>, "ok": False, "errno": <int>, "error": <text>}``.

Each request type is a frozen dataclass registered here with its op name; its
annotations are the schema.  ``decode_request`` validates what arrives (unknown
op, missing field, wrong type -> ``ProtocolError``, which the receiving loop
turns into an ``EINVAL`` error reply) so that handlers never poke at raw dicts.

The coordinator never trusts the client library: an integer field holds what the
kernel's type holds (``int`` is a signed 64-bit register, ``U64`` an unsigned one:
addresses and lengths), a float field is finite, and ``Limit`` caps the length of
a string or list field.  msgpack itself carries no integer outside
``-2**63 .. 2**64-1``.

Page lists travel as packed numpy arrays (``Array`` fields: raw bytes of a
fixed dtype), never as per-page msgpack lists; see
reference/python-ipc-measurements.md section 3 for why (30-60x cheaper).

Frame contents travel beside the map, not in it: a message is one zmq frame (the msgpack
map, the *header*) or two (the header and a *data frame*).  A request field annotated
``DataFrame`` (``write_frames``'s and ``write_elements``' ``data``) is the data frame, and
the header holds its length under the field's name; a reply with contents
(``read_frames``, ``read_elements``) is ``{"re": <seq>, "ok": True, "data": <length>}``
and the bytes.  msgpack then never copies megabytes (packing one costs milliseconds here,
its buffer grows by reallocation), and either end can hand the bytes to zmq or take them
from zmq's buffer without a copy.  ``message_frames`` builds a request's frames,
``unpack_message`` checks a received message's shape: at most one data frame, of the
length its header says.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import types
from dataclasses import dataclass
from typing import Annotated, Any, Union, get_args, get_origin, get_type_hints

import msgpack
import numpy as np

from .constants import CPU_SETSIZE

#: dtypes of the packed arrays, fixed by the protocol.
VPN = np.dtype("<u8")  # virtual page numbers and addresses
PFN = np.dtype("<i8")  # frame numbers within a node
NODE = np.dtype("<i2")  # node ids
STATUS = np.dtype("<i4")  # per-page results (node or -errno)
PROT = np.dtype("<u1")  # per-page translation bits (PROT_* below)

#: Bits of a translation handed to a client on a fault.
PROT_READ = 1
PROT_WRITE = 2
PROT_ZERO = 4  # the shared zero page: readable, never writable, no frame


class ProtocolError(ValueError):
    """A message that does not follow the schema."""


class Array:
    """Annotation for a packed numpy array field of a fixed dtype."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype)

    def __repr__(self) -> str:
        return f"Array({self.dtype})"


class Payload:
    """Annotation for the field carried as the message's data frame (raw bytes after the
    header, which holds their length); only a field named ``data``."""

    def __repr__(self) -> str:
        return "DataFrame"


class Range:
    """``Annotated`` metadata: an integer field's bounds (those of a kernel type)."""

    def __init__(self, ctype: str, lo: int, hi: int) -> None:
        self.ctype, self.lo, self.hi = ctype, lo, hi

    def __repr__(self) -> str:
        return f"Range({self.ctype})"


class Limit:
    """``Annotated`` metadata: at most ``n`` items (a list) or characters (a string)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __repr__(self) -> str:
        return f"Limit({self.n})"


INT64 = Range("int64", -(1 << 63), (1 << 63) - 1)
UINT64 = Range("uint64", 0, (1 << 64) - 1)
#: An unsigned long: addresses and lengths.  A plain ``int`` field is a signed long.
U64 = Annotated[int, UINT64]
#: Longest free-text field (a command name, a sysctl name): names with a tighter
#: kernel limit (shared-object names, paths) are checked by their handlers, who
#: answer ENAMETOOLONG as the kernel does.
MAX_TEXT = 1 << 16

VpnArray = Array(VPN)
PfnArray = Array(PFN)
NodeArray = Array(NODE)
StatusArray = Array(STATUS)
ProtArray = Array(PROT)
#: A request field whose bytes travel as the data frame (module docstring).
DataFrame = Payload()

#: Bytes of frame contents one read_frames / write_frames message carries at most: a whole
#: file's writeback travels as many bounded messages, and the endpoints that carry frame
#: contents can refuse anything much bigger (``max_frame_message``).
MAX_FRAME_DATA = 16 << 20


def frames_per_message(page_size: int) -> int:
    """How many frames' contents fit in one message (at least one)."""
    return max(1, MAX_FRAME_DATA // page_size)


def elements_per_message(itemsize: int) -> int:
    """How many items one read_elements / write_elements message carries at most (their
    positions and their contents each stay within ``MAX_FRAME_DATA``)."""
    return MAX_FRAME_DATA // max(itemsize, PFN.itemsize)


#: Room in a header frame beside its biggest field (a message's worth of item positions).
HEADER_SLACK = 1 << 16


def max_frame_message(page_size: int) -> int:
    """The size limit of one zmq frame on an endpoint that carries frame contents
    (ZMQ_MAXMSGSIZE, which libzmq applies per frame): a data frame holds at most
    ``MAX_FRAME_DATA`` (or one page, if bigger), a header at most a message's worth of
    item positions (``elements_per_message``) beside a few small fields."""
    return max(MAX_FRAME_DATA, page_size) + HEADER_SLACK


REQUESTS: dict[str, type] = {}
#: Fire-and-forget messages (``Peer.post``): the sender does not wait for a reply, and a send
#: that fails fails the peer instead of raising (coordinator/links.py).
POSTED = frozenset({"free", "account", "ping", "exit", "heartbeat", "resched"})


def request(op: str):
    """Register a frozen dataclass as the schema of request ``op``."""

    def register(cls: type) -> type:
        cls = dataclass(frozen=True)(cls)
        cls.op = op
        hints = get_type_hints(cls, include_extras=True)
        cls._fields = tuple((f.name, hints[f.name], f) for f in dataclasses.fields(cls))
        clash = {"op", "seq", "re"} & {name for name, _, _ in cls._fields}
        if clash:
            raise TypeError(f"{op}: field names {clash} are reserved by the envelope")
        payload = [name for name, kind, _ in cls._fields if isinstance(kind, Payload)]
        if payload not in ([], ["data"]):
            raise TypeError(f"{op}: the data frame is the field 'data', not {payload}")
        #: the field carried as the data frame ("data"), or None
        cls._payload = payload[0] if payload else None
        REQUESTS[op] = cls
        return cls

    return register


def _check(name: str, kind: Any, value: Any) -> Any:
    """Validate (and convert) one field value against its annotation."""
    if isinstance(kind, Array):
        if not isinstance(value, (bytes, bytearray)):
            raise ProtocolError(f"field {name!r} must be packed {kind.dtype} bytes")
        if len(value) % kind.dtype.itemsize:
            raise ProtocolError(f"field {name!r} has a partial {kind.dtype} item")
        return np.frombuffer(value, dtype=kind.dtype)
    if kind is int:  # (the plain kinds first: get_origin costs more than their checks)
        value = _check_int(name, value)
        if not INT64.lo <= value <= INT64.hi:
            raise ProtocolError(f"field {name!r} is out of int64 range")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ProtocolError(f"field {name!r} must be a bool")
        return value
    origin = get_origin(kind)
    if origin is Annotated:
        base, *meta = get_args(kind)
        ranged = any(isinstance(m, Range) for m in meta)
        value = _check_int(name, value) if base is int and ranged else _check(name, base, value)
        for m in meta:
            if isinstance(m, Range) and not m.lo <= value <= m.hi:
                raise ProtocolError(f"field {name!r} is out of {m.ctype} range")
            if isinstance(m, Limit) and len(value) > m.n:
                raise ProtocolError(f"field {name!r} is longer than {m.n}")
        return value
    if origin is Union or origin is types.UnionType:
        options = get_args(kind)
        if value is None and type(None) in options:
            return None
        options = [option for option in options if option is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own complaint says more
            return _check(name, options[0], value)
        for option in options:
            try:
                return _check(name, option, value)
            except ProtocolError:
                continue
        raise ProtocolError(f"field {name!r} has the wrong type {type(value).__name__}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ProtocolError(f"field {name!r} must be a list")
        (item,) = get_args(kind)[:1]
        return tuple(_check(name, item, v) for v in value)
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"field {name!r} must be a map")
        return value
    if kind is Any:
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(f"field {name!r} must be a number")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ProtocolError(f"field {name!r} must be finite")
        return number
    if kind is str:
        if not isinstance(value, str):
            raise ProtocolError(f"field {name!r} must be a string")
        return value
    if kind is bytes:
        if not isinstance(value, (bytes, bytearray)):
            raise ProtocolError(f"field {name!r} must be bytes")
        return bytes(value)
    raise ProtocolError(f"field {name!r}: unsupported schema type {kind!r}")


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"field {name!r} must be an integer")
    return value


def _pack_default(value: Any) -> Any:
    """What msgpack cannot pack itself: numpy arrays become packed bytes, numpy integers
    ints, sets sorted lists; anything else is a ``TypeError``."""
    if isinstance(value, np.ndarray):
        return value.tobytes()
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, int):  # (msgpack asks here about an int beyond 64 bits)
        raise OverflowError(f"integer {value} is out of range")
    raise TypeError(f"cannot send a {type(value).__name__}")


def pack(obj: dict) -> bytes:
    """Encode a message map (numpy arrays become packed bytes)."""
    return msgpack.packb(obj, use_bin_type=True, default=_pack_default)


def unpack(raw: bytes) -> dict:
    """Decode a message map; anything that is not a msgpack map is a ``ProtocolError``."""
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ProtocolError(f"undecodable message: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("a message must be a map")
    return obj


def message_frames(req: Any, seq: int) -> list:
    """A registered request dataclass instance with its sequence number, as the frames of
    one message: ``[header]``, or ``[header, data]`` for a request with a ``DataFrame``
    field (its value, any bytes-like object, is sent as it is: no copy here)."""
    body = {"op": req.op, "seq": seq}
    data = None
    for name, _kind, _field in req._fields:
        body[name] = getattr(req, name)
    if req._payload is not None:
        data = body[req._payload]
        body[req._payload] = data.nbytes if isinstance(data, (memoryview, np.ndarray)) \
            else len(data)
        return [pack(body), data]
    return [pack(body)]


def encode_request(req: Any, seq: int) -> bytes:
    """A request without a data frame as the one frame of its message."""
    frames = message_frames(req, seq)
    if len(frames) != 1:
        raise TypeError(f"{req.op} carries a data frame: use message_frames")
    return frames[0]


def unpack_message(frames: list) -> tuple[dict, memoryview | None]:
    """The header map and the data frame (None: none) of a message of one or two frames
    (bytes-like objects), checked by ``data_frame``."""
    if not frames:
        raise ProtocolError("an empty message")
    obj = unpack(frames[0])
    return obj, data_frame(obj, frames)


def data_frame(header: dict, frames: list) -> memoryview | None:
    """The data frame of a message whose first frame unpacked to ``header`` (None: it has
    none).  It needs its length in the header's ``data`` field: a message of more than two
    frames, or whose data frame is not as long as its header says, is a ``ProtocolError``."""
    if len(frames) == 1:
        return None
    if len(frames) != 2:
        raise ProtocolError(f"a message of {len(frames)} frames (a header and at most one "
                            "data frame)")
    data = memoryview(frames[1])
    if data.ndim != 1 or data.itemsize != 1:
        data = data.cast("B")
    size = header.get("data")
    if type(size) is not int or size != data.nbytes:
        raise ProtocolError(f"a data frame of {data.nbytes} bytes, but the header says "
                            f"{size!r}")
    return data


def decode_request(obj: dict, data: memoryview | None = None) -> Any:
    """Validate an unpacked map (with its data frame, from ``unpack_message``) as a
    registered request and build its dataclass."""
    op = obj.get("op")
    cls = REQUESTS.get(op) if isinstance(op, str) else None
    if cls is None:
        raise ProtocolError(f"unknown op {op!r}")
    if (data is None) != (cls._payload is None):
        raise ProtocolError(f"{op}: " + ("a data frame it does not take" if data is not None
                                         else f"no data frame for field {cls._payload!r}"))
    values = {}
    for name, kind, field in cls._fields:
        if name == cls._payload:
            values[name] = data  # (its length was checked against the header)
        elif name in obj:
            values[name] = _check(name, kind, obj[name])
        elif field.default is not dataclasses.MISSING:
            values[name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            values[name] = field.default_factory()
        else:
            raise ProtocolError(f"{op}: missing field {name!r}")
    return cls(**values)


def ok_reply(seq: Any, **fields: Any) -> bytes:
    """A success reply to request ``seq``."""
    return pack({"re": seq, "ok": True, **fields})


def data_reply(seq: Any, data) -> list:
    """A success reply carrying ``data`` (any bytes-like object, not copied here) as its
    data frame: the frames of the message."""
    size = data.nbytes if isinstance(data, (memoryview, np.ndarray)) else len(data)
    return [msgpack.packb({"re": seq, "ok": True, "data": size}, use_bin_type=True), data]


def error_reply(seq: Any, err: int, message: str) -> bytes:
    """An error reply carrying a Linux errno."""
    return pack({"re": seq, "ok": False, "errno": int(err), "error": message})


def protocol_error_reply(obj: Any, exc: Exception) -> bytes:
    """The reply to a malformed message: ``EINVAL`` and what was wrong with it."""
    seq = obj.get("seq") if isinstance(obj, dict) else None
    return error_reply(seq, errno.EINVAL, f"malformed message: {exc}")


# --------------------------------------------------------------------------
# Client -> coordinator (the syscall interface)


@request("ping")
class Ping:
    pass


@request("info")
class Info:
    """Cluster description: topology, endpoints, node segments."""


@request("attach")
class Attach:
    os_pid: int
    host: str
    uid: int
    cpu: int | None = None
    privileged: bool = False
    command: Annotated[str, Limit(MAX_TEXT)] = ""
    cpuset: Annotated[str, Limit(MAX_TEXT)] | None = None  # start in this cpuset, not the root


@request("cpusets")
class Cpusets:
    """Every cpuset: name, cpus, mems, memory_migrate, tasks."""


@request("cpuset_create")
class CpusetCreate:
    name: Annotated[str, Limit(MAX_TEXT)]
    cpus: list[int]
    mems: list[int]
    memory_migrate: bool = False


@request("cpuset_update")
class CpusetUpdate:
    name: Annotated[str, Limit(MAX_TEXT)]
    cpus: list[int] | None = None
    mems: list[int] | None = None
    memory_migrate: bool | None = None


@request("cpuset_attach")
class CpusetAttach:
    """Move task ``target`` into cpuset ``name`` (its pages follow with memory_migrate)."""

    name: Annotated[str, Limit(MAX_TEXT)]
    target: int


@request("cpuset_remove")
class CpusetRemove:
    name: Annotated[str, Limit(MAX_TEXT)]


@request("detach")
class Detach:
    pid: int


@request("mmap")
class Mmap:
    pid: int
    length: U64
    shared: str | None = None
    file: str | None = None
    populate: bool = False


@request("munmap")
class Munmap:
    pid: int
    addr: U64
    length: U64


@request("fault")
class Fault:
    """Resolve every missing translation of one access, in one request."""

    pid: int
    vpns: VpnArray
    write: bool


@request("set_mempolicy")
class SetMempolicy:
    pid: int
    mode: int
    nodes: Any = None
    flags: int = 0


@request("get_mempolicy")
class GetMempolicy:
    pid: int
    addr: U64 | None = None
    flags: int = 0


@request("mbind")
class Mbind:
    pid: int
    addr: U64
    length: U64
    mode: int
    nodes: Any = None
    flags: int = 0
    flushed: bool = False  # the caller dropped its own translations of the range first


@request("move_pages")
class MovePages:
    pid: int
    target: int | None
    pages: VpnArray
    nodes: Any = None
    flags: int = 0
    flushed: bool = False  # the caller dropped its own translations of ``pages`` first


@request("migrate_pages")
class MigratePages:
    pid: int
    target: int | None
    old_nodes: Any
    new_nodes: Any
    flushed: bool = False  # the caller dropped all its translations first


@request("pin")
class Pin:
    """get_user_pages: hold a reference on every page of the range."""

    pid: int
    addr: U64
    length: U64


@request("unpin")
class Unpin:
    pid: int
    pin: int


@request("inject_fault")
class InjectFault:
    """Make node ``node`` fail (or, with ``delay``, slow down) its next ``count`` requests
    ``request``: tests of back-out paths and of waits on pages under migration."""

    pid: int
    node: int
    request: Annotated[str, Limit(MAX_TEXT)]
    count: int = 1
    delay: float = 0.0


@request("msync")
class Msync:
    pid: int
    addr: U64
    length: U64


@request("shm_unlink")
class ShmUnlink:
    pid: int
    name: str


@request("sched_setaffinity")
class SchedSetaffinity:
    pid: int
    cpus: Annotated[list[int], Limit(CPU_SETSIZE)]


@request("numa_maps")
class NumaMaps:
    pid: int


@request("numastat")
class Numastat:
    pass


@request("tasks")
class Tasks:
    pass


@request("node_free_map")
class NodeFreeMap:
    """A node's free bitmap (benchmarks find free frames for their baseline copies)."""

    pid: int
    node: int


@request("sysctl")
class Sysctl:
    """Read or (privileged) set a tunable, like /proc/sys: ``migrate_batch``,
    ``kernel.numa_balancing*``, ``numaemu.numa_sampling``."""

    name: Annotated[str, Limit(MAX_TEXT)]
    value: int | None = None
    pid: int | None = None  # the calling task (None: the connection's caller)


@request("access_profile")
class AccessProfile:
    """What NUMA hinting faults recorded (of task ``pid``, or every task); ``reset`` forgets
    what is returned."""

    pid: int | None = None
    reset: bool = False


@request("check")
class Check:
    """Verify the coordinator's invariants against the nodes (ARCHITECTURE.md 1, 3)."""


@request("shutdown")
class Shutdown:
    pass


# --------------------------------------------------------------------------
# Client shootdown thread <-> coordinator (tlb endpoint)


@request("tlb_hello")
class TlbHello:
    pid: int


@request("heartbeat")
class Heartbeat:
    pid: int


@request("resched")
class Resched:
    """The scheduler moved the task to ``cpu`` (its cpuset changed): the client charges its
    accesses from that CPU's node from now on.  Posted, no reply."""

    cpu: int


@request("invalidate")
class Invalidate:
    """Drop cached translations (the emulated TLB-flush IPI); ack when no access is in flight."""

    vpns: VpnArray
    write_only: bool = False


# --------------------------------------------------------------------------
# Coordinator <-> node


@request("register")
class Register:
    node: int
    path: str
    frames: int
    page_size: int
    host: str
    os_pid: int
    data_endpoint: str = ""


@request("alloc")
class Alloc:
    """Take ``count`` frames (contiguous runs preferred), zero them, put them on the LRU."""

    count: int
    zero: bool = True
    stats: dict = dataclasses.field(default_factory=dict)


@request("free")
class Free:
    pfns: PfnArray


@request("account")
class Account:
    """Add numastat counter increments (numa_foreign lands on the intended node)."""

    stats: dict


@request("read_frames")
class ReadFrames:
    """The contents of ``pfns``, as one byte string of the frames in list order; with
    ``offset``/``length``, only bytes ``[offset, offset + length)`` of it (``length`` -1:
    to the end).  A client's access of part of a page reads only that part.  Reply: the
    bytes as its data frame (``data_reply``)."""

    pfns: PfnArray
    offset: int = 0
    length: int = -1


@request("write_frames")
class WriteFrames:
    """Store ``data`` into the frames of ``pfns`` taken as one byte string, from byte
    ``offset`` on (``offset`` < page size; the data ends in the last frame): the rest of
    the first and last frames is left as it is, so a partial write clobbers nothing."""

    pfns: PfnArray
    data: DataFrame
    offset: int = 0


@request("read_elements")
class ReadElements:
    """Items of ``itemsize`` bytes at item positions ``elements`` of the node's memory taken
    as one array of such items (a client's array gather: numaemu/ndarray.py).  Reply: the
    items' bytes as its data frame."""

    elements: PfnArray
    itemsize: int


@request("write_elements")
class WriteElements:
    """Store ``data`` (one item of ``itemsize`` bytes per position, in order: a repeated
    position keeps the last) at item positions ``elements`` (an array scatter)."""

    elements: PfnArray
    itemsize: int
    data: DataFrame


@request("copy_in")
class CopyIn:
    """Copy frames of another node into frames of this one (seed step 12)."""

    src_node: int
    src_path: str
    src_endpoint: str
    src_pfns: PfnArray
    dst_pfns: PfnArray


@request("inject")
class Inject:
    """Fault injection for tests: the next ``count`` requests ``request`` fail with EIO,
    or, with ``delay`` > 0, are served ``delay`` seconds late."""

    request: str
    count: int = 1
    delay: float = 0.0


@request("free_map")
class FreeMap:
    """The node's free bitmap (np.packbits), for invariant checks."""


@request("node_stats")
class NodeStats:
    pass


@request("exit")
class Exit:
    pass
