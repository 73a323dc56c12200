"""A *context*: what a worker must load and keep warm to serve a batch, named by a stable id.

The paper's central idea is that this state outlives any single inference. Here a context is the model
(a hub id or a local directory, a revision, a dtype); the worker also keeps, per context, the tokenizer and
the label-token ids it derived from it. Two producers that name the same model the same way get the same
context id, so the broker can route their work to workers that already hold it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import msgspec

from pervade.errors import ConfigError

#: dtypes a worker knows how to load. "auto" keeps the checkpoint's own dtype (SmolLM2: bf16).
DTYPES = ("auto", "float32", "bfloat16", "float16")


class ContextSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The model a batch needs. Travels inside every batch so any worker can load it."""

    model: str
    revision: str | None = None
    dtype: str = "auto"

    @property
    def context_id(self) -> str:
        """A stable id: the same spec always hashes to the same id, on every machine."""
        canonical = msgspec.msgpack.encode((self.model, self.revision or "", self.dtype))
        return "ctx-" + hashlib.sha256(canonical).hexdigest()[:16]

    def validate(self) -> ContextSpec:
        if not self.model:
            raise ConfigError("the context needs a model: a hub id or a local directory")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        return self


def make_context(model: str, revision: str | None = None, dtype: str = "auto") -> ContextSpec:
    """Build a validated spec. A local directory is named by its absolute path, so that every
    producer on the shared file system agrees on the id; anything else is taken as a hub id."""
    if os.path.isdir(model):
        model = str(Path(model).resolve())
    return ContextSpec(model=model, revision=revision, dtype=dtype).validate()
