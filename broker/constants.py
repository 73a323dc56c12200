"""The broker's names and limits in one place: its counters, what it tells a peer it does not know, and
the bounds it keeps on job errors, deliveries per turn and clocks."""

from __future__ import annotations

#: What the broker tells a peer it does not know (it restarted, or declared the peer dead).
REGISTER_AGAIN = "unknown peer: register again"
#: Errors kept per job for JobDone (all of them are in the failures files).
MAX_JOB_ERRORS = 20
#: Claims a slice holds at most by default (``--slice-claims``; ``BrokerStore.add``): a worker's run
#: (``gpuworker/intake.py``'s ``MIN_RUN_CLAIMS``), so a slice is one pass and a worker's window holds two.
DEFAULT_SLICE_CLAIMS = 256
#: Completed batches handed to sinks per turn of the loop.
DELIVER_PER_TURN = 1000
#: Fewest seconds between two ``RollNow`` to one sink: a stream of small jobs, each ended before the next begins,
#: would otherwise close a file per job. Between two hints the sink's own idle roll closes its file as before.
ROLL_NOW_MIN_INTERVAL_S = 2.0
#: How much faster (claims per second of compute on the context, ``WorkerRecord.pace``) an idle worker must
#: be than the holder of a batch's copy to copy that batch again (``Scheduler.speculate``): an A10 falling idle
#: while a TITAN X Pascal, a tenth of its speed, computes what it copied from another TITAN X. Between workers
#: of like speed a second copy would only duplicate work.
COPY_SPEED_RATIO = 2.0
#: Messages the loop reads (grouped or not) before it dispatches, commits and sends: no reply of a turn waits
#: for more than this many others to be read.
RECEIVE_PER_TURN = 4096
#: A peer's time this far ahead of the broker's, or a result finished this long ago, is a clock set wrong:
#: the broker keeps the result and moves its times onto its own clock (a result can arrive late, after a
#: reconnection, but not from the future, and not a day late).
MAX_CLOCK_AHEAD_S = 60.0
MAX_RESULT_AGE_S = 86_400.0

COUNTERS = (
    "invalid_messages",  # frames that were not valid messages, or that a handler refused
    "unknown_peer_messages",  # messages from peers not registered (answered with Disconnect)
    "duplicate_submissions",  # batches submitted again (a restarted producer): acknowledged, not queued
    "duplicate_results",  # results for batches already done: a duplicate execution, suppressed
    "late_results_accepted",  # results from a worker the batch was no longer assigned to, accepted
    "requeues",  # batches put back in a queue after a worker failed or died
    "released",  # batches handed back by a stopping worker
    "redeliveries",  # deliveries to sinks that left before acknowledging them
    "workers_declared_dead",  # workers that missed their heartbeats
    "sinks_declared_dead",
    "batches_failed",  # batches given up on after max_attempts
    "speculative_assignments",  # batches also given to an idle worker while another held them (end of a queue)
    "batches_split",  # failed batches of several claims split in two parts, each retried
    "files_fetched",  # contexts' files fetched into a worker's node cache
    "origin_bytes",  # model-file bytes workers read from the origin (shared file system, hub)
    "peer_bytes",  # model-file bytes workers fetched from peers
    "cached_bytes",  # model-file bytes workers found in their node cache
    "claims_completed",  # claims of the batches workers completed (each batch counted once)
    "context_loads",  # contexts workers reported loaded
    "context_load_failures",  # contexts workers reported they could not load
    "status_requests",  # snapshots served (pervade status)
    "progress_requests",  # jobs' progress served (sinks' progress bars)
    "conflicting_submissions",  # batches refused: a known id with other content, or new to an ended job
    "jobs_found_incomplete",  # end_job that named batches the broker does not hold (lost state): resubmitted
    "jobs_aborted",  # jobs their producer abandoned midway (bad input): queued batches recorded failed
    "results_refused",  # results that could not be taken; their batch is requeued and the worker told
    "clock_skew_corrected",  # results and batches whose times came from a clock set wrong, moved to the broker's
    "registrations_refused",  # workers or sinks refused: their name is held by another live process
    "state_damage_detected",  # opens of a state whose write-ahead log had lost commits
    "unadmitted_messages",  # messages from a key not admitted (any more): revoked, never acted on
    "role_refusals",  # messages a key's role may not send (a producer key's pull): refused, never acted on
    "keys_revoked",
    "slices_dissolved",  # slices that failed, requeued as the producer batches they held (each on its own)
    "sink_acks_refused",  # acknowledgements from a sink key the batch was not delivered to: not counted written  # admitted keys removed from authorized/ while the broker ran: their peers cut off
)
