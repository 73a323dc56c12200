"""The exceptions pervade raises, all under one root so callers can catch them together.

    PervadeError
    ├── ConfigError              a bad option or argument (caught by the CLI, printed, exit 2)
    ├── InputError               bad user input
    │   ├── TemplateError        a templates file that is missing, malformed, or lacks the placeholder
    │   └── ClaimsError          a claims source that cannot be read, or a record without a usable claim
    ├── ProtocolError            a frame that is not a valid message of this protocol version
    ├── ContextLoadError         a model or tokenizer that cannot be loaded, or cannot score the labels
    ├── BrokerUnreachable        a broker that did not answer in time (pervade status)
    ├── StateError               a broker state directory in use by another broker, or damaged
    ├── RegistrationRefused      a worker or sink whose name another live process holds
    ├── OutputError              an output directory the sink cannot write (full, read-only): retried
    └── JobFailed                a job that ended with batches rejected, failed or missing
"""

from __future__ import annotations


class PervadeError(Exception):
    """Root of every error pervade raises on purpose."""


class ConfigError(PervadeError):
    """An option or argument that cannot work."""


class InputError(PervadeError):
    """User input (claims, templates) that cannot be used."""


class TemplateError(InputError):
    """A prompt-templates file that is missing, malformed, or lacks the ``{claim}`` placeholder."""


class ClaimsError(InputError):
    """A claims source that cannot be read, or a record without a usable id or claim."""


class ProtocolError(PervadeError):
    """A frame that does not decode into a valid message of this protocol version."""


class ContextLoadError(PervadeError):
    """A model or tokenizer that cannot be loaded, or whose vocabulary cannot score the labels."""


class BrokerUnreachable(PervadeError):
    """A broker that did not answer a request in time: not running, the wrong endpoint, or refused keys."""


class StateError(PervadeError):
    """A broker state directory that another broker holds, or whose database is damaged."""


class RegistrationRefused(PervadeError):
    """The broker refused this worker's or sink's registration: another live process holds its name."""


class OutputError(PervadeError):
    """The sink could not make its output durable (a full disk, a read-only or vanished directory)."""


class JobFailed(PervadeError):
    """A job whose batches were rejected by the broker or failed on the workers."""
