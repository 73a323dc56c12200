"""Telling whether SQLite dropped commits from a damaged write-ahead log, before the broker trusts its state.

SQLite replays a write-ahead log up to the first frame whose checksum fails and silently ignores the
rest: random bytes in the middle of ``broker.sqlite3-wal`` roll the state back to an older commit and
nothing says so. The broker survives that (its producers count what they submitted and resubmit what it
lost), but it must say so. So before opening the database it reads the log's frame headers (24 bytes per
frame, no page contents), and after opening asks SQLite how many frames it accepted: a commit frame of
the log's current generation (matching salts) beyond that point is a commit SQLite threw away. A torn
last transaction (the broker killed mid-commit) has no commit frame there, so it is not mistaken for
damage. A log whose own header is damaged is ignored by SQLite as a whole.

The format: https://www.sqlite.org/fileformat2.html#walformat
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

WAL_MAGIC = (0x377F0682, 0x377F0683)
HEADER_BYTES = 32
FRAME_HEADER_BYTES = 24


@dataclass(frozen=True)
class LogScan:
    """What a write-ahead log holds, read from its headers."""

    #: The log's header is intact (its checksum verifies); if not, SQLite ignores the whole log.
    header_ok: bool
    #: Bytes in the file beyond the header.
    body_bytes: int
    #: 1-based positions of the commit frames of the current generation (the header's salts).
    commit_frames: tuple[int, ...] = ()

    def lost_commits(self, frames_replayed: int) -> int:
        """Commits in the log that SQLite did not replay, given how many frames it accepted."""
        if not self.header_ok:
            return 1 if self.body_bytes else 0  # at least one: the log held frames that were all dropped
        return sum(1 for frame in self.commit_frames if frame > frames_replayed)


def _checksum(data: bytes, big_endian: bool, s0: int = 0, s1: int = 0) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def scan_log(path: Path) -> LogScan | None:
    """Read the frame headers of the write-ahead log at ``path``; None when there is no log to replay."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(HEADER_BYTES)
            size = handle.seek(0, 2)
            if len(header) < HEADER_BYTES:
                return None
            magic, _, page_size, _, salt1, salt2, check1, check2 = struct.unpack(">8I", header)
            body_bytes = size - HEADER_BYTES
            if magic not in WAL_MAGIC or _checksum(header[:24], magic & 1 == 1) != (check1, check2) or page_size < 512:
                return LogScan(header_ok=False, body_bytes=body_bytes)
            commits = []
            frame_bytes = FRAME_HEADER_BYTES + page_size
            for index in range(body_bytes // frame_bytes):
                handle.seek(HEADER_BYTES + index * frame_bytes)
                _, db_pages, frame_salt1, frame_salt2 = struct.unpack(">4I", handle.read(16))
                if (frame_salt1, frame_salt2) == (salt1, salt2) and db_pages:
                    commits.append(index + 1)
    except FileNotFoundError:
        return None
    return LogScan(header_ok=True, body_bytes=body_bytes, commit_frames=tuple(commits))
