"""Reading claims with Hugging Face ``datasets``, streamed, from a hub name or a local file.

Local ``.jsonl``/``.json``/``.csv``/``.parquet`` files and hub datasets go through the same streaming reader,
so a 145k-claim set never has to sit in memory or in a cache first. Field names are mapped by
``ClaimFields`` (the defaults fit FEVER). Every record is checked: a record without an id or a non-empty
string claim raises ClaimsError naming the record, or is skipped and counted when the caller asks for that.

``scan_claims`` reads a source whole before anything is sent: it validates every record and digests the
claims chunk by chunk (``chunk_digest``). The digest names the job (a changed file is a new job), and the
chunk digests let the producer check, as it reads the claims again to send them or to resubmit what a
broker lost, that they are still the claims it scanned.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path

import msgspec
import structlog

from pervade.errors import ClaimsError
from pervade.protocol import Claim
from pervade.samples import sample_claims_path  # noqa: F401 (the producer's API offers the sample claims)

log = structlog.get_logger("pervade.producer.claims")

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class ClaimFields:
    """Which fields of a record hold the id, the claim and the gold label (None: no labels)."""

    id: str = "id"
    claim: str = "claim"
    label: str | None = "label"


@dataclass
class ClaimsSource:
    """Where claims come from and how to read them."""

    #: A local file path, or a hub dataset name.
    location: str
    fields: ClaimFields = field(default_factory=ClaimFields)
    #: Split of a hub dataset (local files have one split, "train").
    split: str = "train"
    #: Configuration (subset) of a hub dataset.
    config: str | None = None
    #: Read at most this many valid claims.
    limit: int | None = None
    #: Skip (and count) invalid records instead of failing on the first one.
    skip_invalid: bool = False
    #: Filled while reading: how many invalid records were skipped.
    skipped: int = 0


def import_claims_reader() -> None:
    """Import what reading claims imports: Hugging Face ``datasets``, and torch, which ``datasets`` imports
    when it makes a streaming dataset (to share it with torch's data-loader workers) unless ``USE_TORCH=0``
    (as ``pervade produce`` sets). Loading torch's C extension holds the GIL for about half a second: done on
    the thread that reads the claims, it stalls the event loop beside it (bench/loop_stalls.py measured
    0.4 s). A producer calls this before its loop starts; it costs nothing more, since reading the claims
    would import both anyway."""
    from datasets import config

    if config.TORCH_AVAILABLE:
        import torch  # noqa: F401


def _open_dataset(source: ClaimsSource):  # -> datasets.IterableDataset
    from datasets import load_dataset  # heavy import, only for the producer (see import_claims_reader)

    path = Path(source.location)
    builder = _BUILDERS.get(path.suffix.lower())
    if path.exists():
        if path.is_dir() or builder is None:
            raise ClaimsError(f"{source.location}: expected a .jsonl, .json, .csv or .parquet file")
        if path.stat().st_size == 0:
            raise ClaimsError(f"{source.location}: the file is empty")
        return load_dataset(builder, data_files=str(path), split="train", streaming=True)
    if builder is not None or source.location.startswith((".", "/", "~")):
        raise ClaimsError(f"{source.location}: no such file")
    return load_dataset(source.location, source.config, split=source.split, streaming=True)


def _label_names(dataset, label_field: str | None) -> list[str] | None:
    """Names of a ClassLabel gold-label column (hub datasets often store labels as ints)."""
    features = getattr(dataset, "features", None) or {}
    return getattr(features.get(label_field), "names", None) if label_field else None


def _to_claim(record: dict, fields: ClaimFields, label_names: list[str] | None) -> Claim:
    if fields.id not in record or record[fields.id] is None:
        raise ValueError(f"no {fields.id!r} field")
    text = record.get(fields.claim)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"field {fields.claim!r} must be a non-empty string, got {text!r:.40}")
    label = record.get(fields.label) if fields.label else None
    if isinstance(label, int) and label_names is not None and 0 <= label < len(label_names):
        label = label_names[label]
    gold = str(label) if label not in (None, "") else None
    claim_id = str(record[fields.id])
    if len(claim_id) > 256:
        raise ValueError(f"id {claim_id[:20]!r}... is longer than 256 characters")
    return Claim(claim_id=claim_id, text=text, gold_label=gold)


def read_claims(source: ClaimsSource) -> Iterator[Claim]:
    """Stream valid claims from ``source``. Raises ClaimsError on unreadable input or, unless
    ``skip_invalid``, on the first invalid record."""
    try:
        dataset = _open_dataset(source)
    except ClaimsError:
        raise
    except Exception as exc:  # datasets raises many kinds: not found, auth, format
        raise ClaimsError(f"cannot open claims {source.location!r}: {exc}") from None
    label_names = _label_names(dataset, source.fields.label)
    source.skipped = 0
    count = 0
    records = iter(dataset)
    index = 0
    # Output rows are keyed by claim id: a repeated id would mean two rows for one key, or one lost.
    seen_ids: set[str] = set()
    while source.limit is None or count < source.limit:
        try:
            record = next(records)
        except StopIteration:
            break
        except Exception as exc:
            raise ClaimsError(_unreadable(source, index, exc)) from None
        index += 1
        try:
            claim = _to_claim(record, source.fields, label_names)
            if claim.claim_id in seen_ids:
                raise ValueError(f"id {claim.claim_id!r} was already used by an earlier record")
            seen_ids.add(claim.claim_id)
        except ValueError as exc:
            if not source.skip_invalid:
                raise ClaimsError(f"{source.location}: record {index}: {exc}") from None
            source.skipped += 1
            log.warning("skipped_invalid_claim", record=index, error=str(exc))
            continue
        count += 1
        yield claim
    if count == 0:
        raise ClaimsError(f"{source.location}: no valid claims found")


def _unreadable(source: ClaimsSource, records_read: int, error: Exception) -> str:
    """Why reading failed, naming the record. The JSON reader parses a file in blocks, so its error comes
    before the records of the block before it are handed out: in a JSON-lines file the bad line is found
    here; in other formats the message says how far reading got."""
    path = Path(source.location)
    if path.suffix.lower() == ".jsonl" and path.is_file():
        line = _first_bad_json_line(path)
        if line is not None:
            number, problem = line
            return f"{source.location}: record {number} (line {number}) is not valid JSON: {problem}"
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"{source.location}: cannot read the records after record {records_read}: {first_line}"


def _first_bad_json_line(path: Path) -> tuple[int, str] | None:
    """The first line of a JSON-lines file that is not a JSON object, and why (blank lines are allowed)."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.rstrip(b"\r\n"))
            except UnicodeDecodeError as exc:
                return number, f"not UTF-8 text ({exc.reason} at byte {exc.start})"
            except json.JSONDecodeError as exc:
                return number, exc.msg + f" at column {exc.colno}"
            if not isinstance(record, dict):
                return number, f"expected a JSON object, got {type(record).__name__}"
    return None


_claims_encoder = msgspec.msgpack.Encoder()


def chunk_digest(claims: list[Claim]) -> bytes:
    """A digest of one chunk of claims (ids, texts, gold labels, in order): what one batch per template
    computes on."""
    return hashlib.sha256(_claims_encoder.encode(claims)).digest()[:16]


def chunks(claims: Iterable[Claim], size: int) -> Iterator[list[Claim]]:
    """``claims`` in lists of ``size`` (the last one shorter): the producer's batches, one per template."""
    iterator = iter(claims)
    while chunk := list(islice(iterator, size)):
        yield chunk


def read_ahead(chunked: Iterator[list[Claim]], claims: int) -> tuple[list[list[Claim]], ClaimsError | None]:
    """The next chunks holding about ``claims`` claims (whole chunks, at least one; none at the end), and the
    ClaimsError that stopped the reading early, if one did: the chunks read before it still count. Blocking:
    an asyncio caller runs it on a thread."""
    taken: list[list[Claim]] = []
    held = 0
    try:
        while held < max(claims, 1) and (chunk := next(chunked, None)) is not None:
            taken.append(chunk)
            held += len(chunk)
    except ClaimsError as exc:
        return taken, exc
    return taken, None


@dataclass(frozen=True)
class ClaimsScan:
    """A claims source read whole: every record valid, and what it holds."""

    claims: int
    skipped: int
    #: One ``chunk_digest`` per chunk of ``chunk_size`` claims.
    chunk_digests: tuple[bytes, ...]
    chunk_size: int

    @property
    def digest(self) -> str:
        """The whole content, as hex: it names the job (with the templates, the model and the batch size)."""
        return hashlib.sha256(b"".join(self.chunk_digests)).hexdigest()


def scan_claims(source: ClaimsSource, chunk_size: int) -> ClaimsScan:
    """Read every claim of ``source`` once, validating all of it (ClaimsError names the first bad record)
    before anything is sent. Blocking: an asyncio caller runs it on a thread."""
    scanned = replace(source)
    digests, count = [], 0
    for chunk in chunks(read_claims(scanned), chunk_size):
        digests.append(chunk_digest(chunk))
        count += len(chunk)
    return ClaimsScan(claims=count, skipped=scanned.skipped, chunk_digests=tuple(digests), chunk_size=chunk_size)


@dataclass(frozen=True)
class ClaimsReader:
    """The claims of a source, read afresh on each iteration: the producer reads them again to resubmit
    what a broker lost."""

    source: ClaimsSource

    def __iter__(self) -> Iterator[Claim]:
        return read_claims(replace(self.source))
