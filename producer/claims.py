"""Reading claims with Hugging Face ``datasets``, streamed, from a hub name or a local file.

Local ``.jsonl``/``.json``/``.csv``/``.parquet`` files and hub datasets go through the same streaming reader,
so a 145k-claim set never has to sit in memory or in a cache first. Field names are mapped by
``ClaimFields`` (the defaults fit FEVER). Every record is checked: a record without an id or a non-empty
string claim raises ClaimsError naming the record, or is skipped and counted when the caller asks for that.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import structlog

from pervade.errors import ClaimsError
from pervade.protocol import Claim

log = structlog.get_logger("producer.claims")

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


def sample_claims_path() -> Path:
    """The small claims file shipped with pervade, for offline runs."""
    return Path(str(resources.files("pervade") / "data" / "sample_claims.jsonl"))


def _open_dataset(source: ClaimsSource):  # -> datasets.IterableDataset
    from datasets import load_dataset  # heavy import, only for the producer

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
            raise ClaimsError(f"{source.location}: cannot read record {index + 1}: {exc}") from None
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
