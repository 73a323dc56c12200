"""What the broker knows about its live peers. Plain records in memory; the broker's verbs mutate them.
Batches and jobs are durable and live in ``broker.store``; peers are not: after a broker restart every
peer registers again."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from pervade.keyring import KeyHolder
from pervade.protocol import DeviceInfo
from pervade.rates import ComputePace, RateMeter


@dataclass
class PeerRecord:
    """Any registered peer: its routing identity, its name, and when the broker last heard from it."""

    identity: bytes
    name: str
    last_seen: float = field(default_factory=time.monotonic)
    #: The process's random token (``WorkerReady.instance``): tells its own reconnection from a second
    #: process under the same name ("" from a peer that sends none).
    instance: str = ""
    #: The CURVE key it registered with (its role and name); None on a broker without keys.
    key: KeyHolder | None = None


@dataclass
class WorkerRecord(PeerRecord):
    host: str = ""
    device: DeviceInfo = field(default_factory=lambda: DeviceInfo(kind="cpu", name="cpu"))
    #: How many contexts fit on the worker at once.
    max_contexts: int = 1
    #: Contexts the worker holds or is loading, least recently told to load first.
    contexts: OrderedDict[str, None] = field(default_factory=OrderedDict)
    #: Contexts this worker failed to load; never offered to it again.
    refused: set[str] = field(default_factory=set)
    #: Contexts the worker reported loaded (or held when it registered).
    loaded: set[str] = field(default_factory=set)
    credit: int = 0
    #: Batches assigned and not answered, oldest first (the worker runs them in this order, so the first
    #: is the one in hand), each with the credit its assignment used (a slice's: one per batch it holds,
    #: up to what the worker had granted), given back if the worker drops it unanswered.
    in_flight: dict[str, int] = field(default_factory=dict)
    batches_done: int = 0
    #: Claims of the batches it completed: total and recent rate.
    claims: RateMeter = field(default_factory=RateMeter)
    #: Claims per second of its own compute, per context, from the times of the results it was given: how
    #: fast its device runs each model (a small model on a slow GPU can outpace a large one on a fast GPU).
    paces: dict[str, ComputePace] = field(default_factory=dict)
    #: Said it is leaving (preempted): gets no more work.
    leaving: bool = False
    #: Where it serves model files to peers ("" if it does not).
    file_endpoint: str = ""
    #: Its results came timed by a clock set wrong (noted once, corrected every time).
    clock_skewed: bool = False

    def pace(self, context_id: str) -> float | None:
        """Its claims per second of compute on ``context_id``; None until it ran a batch of it."""
        pace = self.paces.get(context_id)
        return None if pace is None else pace.per_second()


@dataclass
class SinkRecord(PeerRecord):
    unacked: set[str] = field(default_factory=set)
    #: The jobs of what it was delivered since it last held nothing unacknowledged. It is told nothing more
    #: is coming (``RollNow``) only once they are all ended: a job abandoned open holds back no later job's
    #: hint once its own batches are acknowledged.
    delivered_jobs: set[str] = field(default_factory=set)
    #: Delivered to since it was last told (``RollNow``), and when it was last told (``time.monotonic``).
    awaiting_roll: bool = False
    told_to_roll_at: float = float("-inf")


@dataclass
class ProducerRecord(PeerRecord):
    pass
