"""Constants shared by every component, in one place."""

from __future__ import annotations

import signal

#: The header frame of every message. A peer speaking another version is refused with an error. Version 2:
#: templates as objects (labels, chat, calibration) and whole-answer scores, null for a label left out.
#: Version 3: a ZeroMQ message carries a group of messages, one frame each, after the header. Version 4: a
#: group travels as one frame, a msgpack array of its messages.
PROTOCOL_HEADER = b"pervade/5"
PROTOCOL_VERSION = 4

#: FEVER's three labels, in the order the scores are reported everywhere (wire, Parquet, summaries).
LABELS: tuple[str, ...] = ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")

#: The placeholder a prompt template must contain exactly once.
CLAIM_PLACEHOLDER = "{claim}"

#: Largest frame the broker accepts (libzmq disconnects a peer that sends more; see zeromq.md).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

#: Milliseconds a socket may keep unsent messages at close, so no process hangs at exit.
SOCKET_LINGER_MS = 1000

#: Milliseconds a client's send may wait for the broker's connection. A healthy connection never makes a
#: send wait (the queue holds 100,000 messages); a refused one (a CURVE handshake the broker rejected)
#: has no pipe at all, and a send would otherwise wait for ever.
SEND_TIMEOUT_MS = 2000

DEFAULT_BROKER_BIND = "tcp://*:5555"
DEFAULT_BROKER_CONNECT = "tcp://127.0.0.1:5555"

#: Signals on which a worker leaves gracefully (hands its batches back, finishes what fits, says goodbye):
#: SIGTERM from Slurm and HTCondor, SIGUSR1/SIGUSR2 from Grid Engine's -notify, SIGINT from a user.
LEAVE_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

#: Exit status of a worker (and of its batch job) that gave up on a broker it could not reach.
EXIT_BROKER_UNREACHABLE = 3
