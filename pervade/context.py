"""A *context*: what a worker must load and keep warm to serve a batch, named by a stable id.

The paper's central idea is that this state outlives any single inference. Here a context is a model's
files (described by a manifest, see ``pervade.manifest``) loaded in one dtype; the worker also keeps, per
context, the tokenizer and the label-token ids it derived from it.

The id is content-addressed: it derives from the manifest's digest and the dtype, not from where the files
live. Two producers naming the same bytes (a hub id, a copy on the shared file system) get the same
context, so the broker routes their work to workers that already hold it, and workers fetch the files from
one another. The spec keeps ``model`` and ``revision`` as the *origin*: where the files can be read when no
peer has them.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import msgspec
import structlog

from pervade.errors import ConfigError
from pervade.manifest import Manifest, build_manifest

log = structlog.get_logger(__name__)

#: dtypes a worker knows how to load. "auto" lets each worker pick for its device: bf16 on GPUs of compute
#: capability 8.0 and up, fp16 on older GPUs, fp32 on a CPU (gpuworker/device.py, docs/heterogeneous.md).
DTYPES = ("auto", "float32", "bfloat16", "float16")

#: Files fetched from the hub to resolve a model: a model repository's top-level weights, config and
#: tokenizer (sub-directories such as onnx/ hold alternative formats a worker never loads).
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
HUB_IGNORE_PATTERNS = ["*/*"]


class ContextMode(str, enum.Enum):
    """How long a worker keeps a context: the paper's three modes, chosen per run to compare their costs."""

    #: Every batch loads the model from its origin (the shared file system or the hub): no reuse at all.
    AGNOSTIC = "agnostic"
    #: The files are cached on the node (fetched once, from peers when they can), but the model is
    #: rebuilt from them for every batch.
    PARTIAL = "partial"
    #: The model stays resident on the device, batch after batch (the default).
    FULL = "full"


class ContextSpec(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True):
    """The model a batch needs. Travels inside every batch, so it stays small: the manifest itself goes
    to the broker once (``DeclareContext``) and to a worker with ``LoadContext``."""

    #: The origin: a hub id or a local directory.
    model: str
    revision: str | None = None
    dtype: str = "auto"
    #: Digest of the files' manifest; None for a context whose files could not be resolved (workers then
    #: load it from the origin themselves, without the node cache or peers).
    files: str | None = None

    @property
    def context_id(self) -> str:
        """A stable id: the same files in the same dtype hash to the same id, on every machine."""
        return _context_id(self.model, self.revision, self.dtype, self.files)

    def validate(self) -> ContextSpec:
        if not self.model:
            raise ConfigError("the context needs a model: a hub id or a local directory")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        return self


@dataclass(frozen=True)
class ResolvedContext:
    """A context with its manifest, as a producer declares it to the broker."""

    spec: ContextSpec
    manifest: Manifest | None

    @property
    def context_id(self) -> str:
        return self.spec.context_id


def make_context(
    model: str, revision: str | None = None, dtype: str = "auto", resolve_files: bool = True
) -> ResolvedContext:
    """A validated context for ``model``, with its files' manifest.

    A local directory is hashed (about 1 s per GB); a hub id is downloaded once into this node's hub cache
    (what ``huggingface-cli download`` would do) and hashed there. When the files cannot be resolved (a hub
    id without network, or ``resolve_files=False``) the context has no manifest and workers load it from
    the origin themselves. Blocking: call it off the event loop.
    """
    ContextSpec(model=model, revision=revision, dtype=dtype).validate()
    if os.path.isdir(model):
        directory = Path(model).resolve()
        manifest = build_manifest(directory) if resolve_files else None
        spec = ContextSpec(model=str(directory), revision=revision, dtype=dtype, files=manifest and manifest.digest)
        return ResolvedContext(spec.validate(), manifest)
    manifest = None
    if resolve_files:
        try:
            snapshot, revision = hub_snapshot(model, revision)
            manifest = build_manifest(snapshot)
        except Exception as exc:  # offline, gated, unknown: the workers may still reach the hub
            log.warning("context_files_unresolved", model=model, error=str(exc))
    spec = ContextSpec(model=model, revision=revision, dtype=dtype, files=manifest and manifest.digest)
    return ResolvedContext(spec.validate(), manifest)


def hub_snapshot(model: str, revision: str | None) -> tuple[Path, str]:
    """Download (or find in the hub cache) a model's files; returns the directory and the commit it is at,
    so that every worker fetching from the hub later gets the very same bytes."""
    from huggingface_hub import snapshot_download

    path = Path(
        snapshot_download(model, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS, ignore_patterns=HUB_IGNORE_PATTERNS)
    )
    return path, path.name  # the hub cache names a snapshot by its commit hash


@functools.lru_cache(maxsize=1024)
def _context_id(model: str, revision: str | None, dtype: str, files: str | None) -> str:
    """``ContextSpec.context_id``, cached: every batch carries its context, and a broker asks for the id of
    each one it is sent: a sha256 per batch, saved."""
    if files is not None:
        canonical = msgspec.msgpack.encode(("files", files, dtype))
    else:
        canonical = msgspec.msgpack.encode((model, revision or "", dtype))
    return "ctx-" + hashlib.sha256(canonical).hexdigest()[:16]
