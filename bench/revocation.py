"""Revocation: how long a revoked key keeps its connection to a real broker.

    .venv/bin/python bench/revocation.py                  # 20 worker keys, revoked one at a time
    .venv/bin/python bench/revocation.py --keys 50 --workers-per-key 2

Target (issue 18): every connection of a revoked key cut within 2 s of its file's removal.

What runs: a real broker (``python -m pervade broker --keys DIR``, loopback, in a temporary directory) and,
in this process, ``--keys`` clients, each holding a worker key of its own (``pervade keys add DIR worker
node-N``) and registered as a worker over ``--workers-per-key`` connections. One key at a time, the script
deletes the key's file (what ``pervade keys revoke`` does) and times, on the client's own socket monitor, the
moment each of its connections is cut (``EVENT_DISCONNECTED``): the broker reads ``authorized/`` every
0.5 s on a thread, drops the key's peers and shuts its connections down (broker/keyguard.py). The other keys'
connections must stay up; they are checked after every revocation. Columns: revocations, connections cut,
connections of other keys cut (must be 0), and the time from removal to cut (p50, p90, max, in ms).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq
import zmq.asyncio
from benchkit import Report
from zmq.utils.monitor import parse_monitor_message

from pervade.jobs.local import wait_for_endpoint
from pervade.keyadmin import add_key
from pervade.keys import ClientKeys, init_keys
from pervade.protocol import DeviceInfo, Heartbeat, PeerKeys, WorkerReady, decode, encode
from pervade.transport import dealer_socket, new_identity

TARGET_S = 2.0


async def registered(sock: zmq.asyncio.Socket, name: str) -> None:
    """Register as a worker and wait for the broker's answer (a keyed broker sends PeerKeys at once)."""
    await sock.send_multipart(
        encode(WorkerReady(worker_id=name, host="bench", pid=0, device=DeviceInfo(kind="cpu", name="cpu")))
    )
    while True:
        if not await sock.poll(10_000):
            raise TimeoutError(f"{name}: no answer from the broker")
        if isinstance(decode(await sock.recv_multipart()), PeerKeys):
            return


async def cut_after(monitor: zmq.asyncio.Socket, since: float, timeout_s: float) -> float | None:
    """Seconds from ``since`` to the monitored socket's next disconnection; None if none within the timeout."""
    deadline = since + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if await monitor.poll(int(left * 1000)):
            if parse_monitor_message(await monitor.recv_multipart())["event"] == zmq.EVENT_DISCONNECTED:
                return time.monotonic() - since
    return None


async def measure(args: argparse.Namespace, root: Path) -> dict[str, object]:
    keys = root / "keys"
    init_keys(keys)
    bundles = [add_key(keys, "worker", f"node-{n}").bundle for n in range(args.keys)]
    endpoint_file = root / "endpoint"
    broker = subprocess.Popen(
        [sys.executable, "-m", "pervade", "broker", "--bind", "tcp://127.0.0.1:*", "--keys", str(keys),
         "--endpoint-file", str(endpoint_file), "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=(root / "broker.log").open("w"),
    )  # fmt: skip
    ctx = zmq.asyncio.Context()
    try:
        endpoint = await wait_for_endpoint(endpoint_file, broker)
        clients: list[list[tuple[zmq.asyncio.Socket, zmq.asyncio.Socket]]] = []
        for n, bundle in enumerate(bundles):
            assert bundle is not None
            key = ClientKeys.load(bundle, "worker")
            sockets = []
            for c in range(args.workers_per_key):
                sock = dealer_socket(ctx, endpoint, new_identity("bench"), key)
                monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
                await registered(sock, f"node-{n}-{c}")
                sockets.append((sock, monitor))
            clients.append(sockets)
        times: list[float] = []
        missed = innocent = 0
        for n, sockets in enumerate(clients):
            revoked_at = time.monotonic()
            (keys / "authorized" / "worker" / f"node-{n}.key").unlink()
            for _, monitor in sockets:
                seconds = await cut_after(monitor, revoked_at, 5.0)
                if seconds is None:
                    missed += 1
                else:
                    times.append(seconds)
            for later in clients[n + 1 :]:  # the keys not revoked yet: still connected, and still heard
                for sock, monitor in later:
                    innocent += bool(await monitor.poll(0))
                    await sock.send_multipart(encode(Heartbeat()))
        cut = sorted(times)
        return {
            "revocations": args.keys, "connections": args.keys * args.workers_per_key, "cut": len(cut),
            "not_cut": missed, "others_cut": innocent,
            "p50_ms": round(1000 * statistics.median(cut), 1) if cut else None,
            "p90_ms": round(1000 * cut[int(0.9 * (len(cut) - 1))], 1) if cut else None,
            "max_ms": round(1000 * cut[-1], 1) if cut else None,
        }  # fmt: skip
    finally:
        broker.terminate()
        broker.wait(10)
        ctx.destroy(linger=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=20, help="worker keys, each revoked in turn (default: 20)")
    parser.add_argument("--workers-per-key", type=int, default=1, help="connections per key (default: 1)")
    parser.add_argument("--out-dir", type=Path, default=None, help="where the CSV goes (default: bench/results)")
    args = parser.parse_args()
    columns = ["revocations", "connections", "cut", "not_cut", "others_cut", "p50_ms", "p90_ms", "max_ms"]
    report = Report("revocation", columns, **({"out_dir": args.out_dir} if args.out_dir else {}))
    report.header("a real broker with keys; each key's file removed in turn; time to its connections' cut")
    with tempfile.TemporaryDirectory(prefix="pervade-revocation-") as root:
        row = asyncio.run(measure(args, Path(root)))
    report.add(**row)
    cut_max = row["max_ms"]
    met = not row["not_cut"] and not row["others_cut"] and cut_max is not None and cut_max < 1000 * TARGET_S
    report.note(
        f"verdict: every connection cut within {TARGET_S:.0f} s, no other key's cut: {'MET' if met else 'MISSED'}"
    )
    report.finish()
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
