"""A fixed one-way delay on a lab host's outgoing packets, for kernels without ``netem``.

The cluster lab (``jobs/lab/cluster.py``) shapes bandwidth with ``tc tbf`` and drops packets with an
nftables rule, both in the kernel. Delay needs netem, which some kernels (this project's VM among them) are
built without. So a host's nftables output chain hands each packet leaving its ``eth0`` to an NFQUEUE, and
this process, run inside the host's network namespace, gives the kernel its verdict ``delay_ms`` later.

It speaks the netlink NFQUEUE protocol directly (``linux/netfilter/nfnetlink_queue.h``): no library to
install, about a hundred lines. Packets are asked for with metadata only (no payload is copied), and since
every packet waits the same time, they leave in the order they came: one batch verdict (accept every id up
to N) releases all those due. The queue fails open: a full queue passes packets undelayed rather than
dropping them, and with no listener at all the rule's ``bypass`` lets them through.

    python -m pervade.jobs.lab.netdelay --queue 0 --delay-ms 20     # inside the host's namespace
"""

from __future__ import annotations

import argparse
import collections
import select
import signal
import socket
import struct
import time
from pathlib import Path

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_FAIL_OPEN = 1
NFQA_CFG_F_GSO = 4
NF_ACCEPT = 1
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
NLMSG_HDR = struct.Struct("=IHHII")
NLATTR_HDR = struct.Struct("=HH")
#: Packets the kernel may hold for us; past it they pass undelayed (fail open).
QUEUE_MAXLEN = 65536
RECEIVE_BUFFER = 16 << 20


def _attribute(kind: int, payload: bytes) -> bytes:
    header = NLATTR_HDR.pack(NLATTR_HDR.size + len(payload), kind)
    padding = b"\0" * (-len(payload) % 4)
    return header + payload + padding


def _message(kind: int, queue: int, attributes: bytes, flags: int = NLM_F_REQUEST) -> bytes:
    nfgen = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack("!H", queue)
    body = nfgen + attributes
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, 0, 0) + body


def bind_queue(sock: socket.socket, queue: int) -> None:
    """Bind ``queue``, metadata only, fail-open, GSO packets whole (no payload is read, so none is split)."""
    flags = NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO
    for attributes in (
        _attribute(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0)),
        _attribute(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
        + _attribute(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN))
        + _attribute(NFQA_CFG_FLAGS, struct.pack("!I", flags))
        + _attribute(NFQA_CFG_MASK, struct.pack("!I", flags)),
    ):
        sock.send(_message(NFQNL_MSG_CONFIG, queue, attributes, NLM_F_REQUEST | NLM_F_ACK))
        sock.settimeout(5)
        packet_ids(sock.recv(1 << 16))  # the acknowledgement: raises if the kernel refused
        sock.settimeout(None)


def packet_ids(data: bytes) -> list[int]:
    """The ids of the packets announced in one netlink datagram (other messages are skipped)."""
    ids = []
    offset = 0
    while offset + NLMSG_HDR.size <= len(data):
        length, kind, _flags, _seq, _pid = NLMSG_HDR.unpack_from(data, offset)
        if length < NLMSG_HDR.size:
            break
        if kind == NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", data, offset + NLMSG_HDR.size)
            if error != 0:
                raise OSError(-error, f"nfqueue: the kernel refused a request ({-error})")
        elif kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            attribute = offset + NLMSG_HDR.size + 4  # after the nfgenmsg
            while attribute + NLATTR_HDR.size <= offset + length:
                attr_length, attr_kind = NLATTR_HDR.unpack_from(data, attribute)
                if attr_length < NLATTR_HDR.size:
                    break
                if attr_kind & 0x7FFF == NFQA_PACKET_HDR:
                    ids.append(struct.unpack_from("!I", data, attribute + NLATTR_HDR.size)[0])
                    break
                attribute += (attr_length + 3) & ~3
        offset += (length + 3) & ~3
    return ids


def accept_through(sock: socket.socket, queue: int, last_id: int) -> None:
    """Accept every queued packet whose id is ``last_id`` or lower."""
    sock.send(
        _message(NFQNL_MSG_VERDICT_BATCH, queue, _attribute(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, last_id)))
    )


def delay_forever(queue: int, delay_s: float, ready_file: Path | None = None) -> None:
    """Hold each packet of ``queue`` for ``delay_s`` (until SIGTERM). ``ready_file`` is created once the queue
    is bound: until then the rule's bypass lets packets pass undelayed, so whoever starts this waits for it."""
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, 33, RECEIVE_BUFFER)  # SO_RCVBUFFORCE: root may exceed rmem_max
    sock.bind((0, 0))
    bind_queue(sock, queue)
    if ready_file is not None:
        ready_file.touch()
    waiting: collections.deque[tuple[float, int]] = collections.deque()
    while running:
        timeout = max(0.0, waiting[0][0] - time.monotonic()) if waiting else 0.5
        readable, _, _ = select.select([sock], [], [], timeout)
        if readable:
            try:
                data = sock.recv(1 << 20)
            except OSError:  # ENOBUFS: announcements lost; their packets go with the next batch verdict
                data = b""
            due = time.monotonic() + delay_s
            waiting.extend((due, packet_id) for packet_id in packet_ids(data))
        now = time.monotonic()
        last = None
        while waiting and waiting[0][0] <= now:
            last = waiting.popleft()[1]
        if last is not None:
            accept_through(sock, queue, last)
    if waiting:
        accept_through(sock, queue, waiting[-1][1])
    sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queue", type=int, default=0, help="the NFQUEUE number the host's rule sends to")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay added to each packet")
    parser.add_argument("--ready-file", type=Path, default=None, help="created once the queue is bound")
    args = parser.parse_args()
    delay_forever(args.queue, args.delay_ms / 1000, args.ready_file)


if __name__ == "__main__":
    main()
