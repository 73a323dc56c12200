"""Command-line options declared once, on the config dataclasses' fields.

A config field that the command line exposes carries its flag, help text and check with its default::

    max_attempts: int = option(3, "a batch failing this many times is recorded as failed",
                               flag="--max-attempts", check=at_least(1))

and the class's ``__post_init__`` calls ``check_options(self)``. ``pervade.cli`` builds its argparse options
from these fields (``add_config_options``), the help showing each field's default, and the config from the
parsed arguments (``build_config``): a flag not given is not passed, so the dataclass's default applies. A
check that fails raises ``OptionError``, a ConfigError that names the field; the CLI names the flag instead.

A field holding another config (``heartbeats: Heartbeats = nested(Heartbeats)``) exposes that config's
options.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
from collections.abc import Callable, Collection, Mapping
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

from pervade.constants import DEFAULT_BROKER_CONNECT
from pervade.errors import ConfigError

OPTION = "pervade.option"
NESTED = "pervade.nested"
#: The Python types a field's annotation names, for fields that do not say how their flag's text is read.
#: Help sections shared by several commands.
LIVENESS_SECTION = "liveness (use the same values on the broker and every client)"
SECURITY_SECTION = "security (CURVE)"
FILES_SECTION = "model files (node cache and peer transfer)"
_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str, "Path": Path}


@dataclass(frozen=True)
class Bounds:
    """The range a number must lie in: a field's check."""

    low: float | None = None
    high: float | None = None
    #: The low bound itself is excluded (``positive``).
    exclusive: bool = False

    def problem(self, value: float) -> str | None:
        """What is wrong with ``value``; None when it is within bounds."""
        if self.low is not None and self.high is not None and not self.low <= value <= self.high:
            return f"must be between {self.low:g} and {self.high:g}"
        if self.low is not None and self.exclusive and value <= self.low:
            return "must be positive" if self.low == 0 else f"must be more than {self.low:g}"
        if self.low is not None and value < self.low:
            return "must be 0 or more" if self.low == 0 else f"must be at least {self.low:g}"
        return None


POSITIVE = Bounds(low=0, exclusive=True)
NON_NEGATIVE = Bounds(low=0)


def at_least(low: int) -> Bounds:
    return Bounds(low=low)


def between(low: int, high: int) -> Bounds:
    return Bounds(low=low, high=high)


class OptionError(ConfigError):
    """A field's check failed; ``field`` names it, so that a command line can name its flag instead."""

    def __init__(self, field: str, problem: str, value: Any) -> None:
        super().__init__(f"{field} {problem}, got {value!r}")
        self.field = field
        self.problem = problem
        self.value = value


@dataclass(frozen=True)
class Option:
    """How a config field appears on the command line."""

    help: str
    #: The flag (``--max-attempts``); None: no flag, the field is set only from Python.
    flag: str | None = None
    check: Bounds | None = None
    metavar: str | None = None
    choices: Collection[Any] | None = None
    #: Reads the flag's text (default: the type the field's annotation names).
    parse: Callable[[str], Any] | None = None
    #: The field holds the flag's value times this (``--chunk-kib``: 1024 bytes); an int then.
    unit: float = 1
    #: The flag takes no value and sets the field to this (``--no-progress``: False).
    const: Any = None
    #: The flag may be repeated; the field holds a tuple of the values.
    repeat: bool = False
    #: How the help shows the default (default: the value itself, in the flag's unit).
    show: Callable[[Any], str] | None = None
    #: Title of the help section the flag is listed in.
    group: str | None = None


@dataclass(frozen=True)
class Nested:
    """A field holding another config, whose options the command line exposes too."""

    cls: type


def option(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, **how: Any) -> Any:
    """A dataclass field with its command-line option (see ``Option`` for ``how``)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={OPTION: Option(help, **how)})


def nested(cls: type) -> Any:
    """A field holding a ``cls`` config (its defaults), whose options are exposed with the outer config's."""
    return dataclasses.field(default_factory=cls, metadata={NESTED: Nested(cls)})


def same_as(cls: type, name: str) -> Any:
    """A field declared like ``cls``'s field ``name``: the same default, flag, help and check."""
    original = _field(cls, name)
    return dataclasses.field(
        default=original.default, default_factory=original.default_factory, metadata=original.metadata
    )


def broker_option() -> Any:
    """The broker's endpoint, as every client takes it."""
    return option(DEFAULT_BROKER_CONNECT, "the broker's ZeroMQ endpoint", flag="--broker", metavar="ENDPOINT")


def progress_option() -> Any:
    """Progress bars on stderr: None draws them only when stderr is a terminal."""
    return option(None, "no progress bars, even on a terminal (default: bars on stderr when it is a terminal)",
                  flag="--no-progress", const=False)  # fmt: skip


def check_options(config: Any) -> None:
    """Run the checks of ``config``'s options (a config's ``__post_init__`` calls this); OptionError if one fails."""
    for field, opt in _options(type(config)):
        value = getattr(config, field.name)
        if opt.check is not None and value is not None:
            problem = opt.check.problem(value)
            if problem is not None:
                raise OptionError(field.name, problem, value)


def flag_of(cls: type, name: str) -> str | None:
    """The flag of ``cls``'s field ``name`` (None: not on the command line)."""
    return next((opt.flag for field, opt in _options(cls) if field.name == name), None)


# --- argparse ---------------------------------------------------------------------------------------------


def add_config_options(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    only: Collection[str] | None = None,
    prefix: str = "",
) -> None:
    """Add an option for each of ``cls``'s fields that has a flag (of ``only`` those, if given), nested configs'
    included. Each option's dest is the field's name (``heartbeats.interval_s`` for a nested one), and a flag
    not given leaves no attribute, so that ``build_config`` lets the field's own default apply."""
    for field in dataclasses.fields(cls):
        inner: Nested | None = field.metadata.get(NESTED)
        opt = field.metadata.get(OPTION)
        if only is not None and field.name not in only:
            continue
        if inner is not None:
            add_config_options(parser, inner.cls, prefix=f"{prefix}{field.name}.")
        elif opt is not None and opt.flag is not None:
            section(parser, opt.group).add_argument(opt.flag, **_argument(opt, field, prefix + field.name))


def build_config(
    cls: type,
    args: argparse.Namespace,
    *,
    only: Collection[str] | None = None,
    prefix: str = "",
    **given: Any,
) -> Any:
    """``cls`` from the options ``add_config_options`` added (only those given: the rest keep the field's
    default), nested configs first, and the ``given`` values. A failed check is a ConfigError naming the flag."""
    values = vars(args)
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        name, inner, opt = prefix + field.name, field.metadata.get(NESTED), field.metadata.get(OPTION)
        if only is not None and field.name not in only:
            continue
        if inner is not None and any(key.startswith(name + ".") for key in values):
            kwargs[field.name] = build_config(inner.cls, args, prefix=name + ".")
        elif opt is not None and opt.flag is not None and name in values:
            kwargs[field.name] = tuple(values[name]) if opt.repeat else values[name]
    kwargs |= given
    try:
        return cls(**kwargs)
    except OptionError as exc:
        opt = next((opt for field, opt in _options(cls) if field.name == exc.field), None)
        if opt is None or opt.flag is None:
            raise
        raise ConfigError(f"{opt.flag} {exc.problem}, got {_text(exc.value, opt)}") from None


def to_argv(cls: type, values: Mapping[str, Any]) -> list[str]:
    """The command line that sets ``cls``'s fields to ``values`` (field name: value), to start another process."""
    argv: list[str] = []
    for field, opt in _options(cls):
        value = values.get(field.name)
        if field.name not in values or opt.flag is None or value is None:
            continue
        if _is_switch(opt, field):
            argv += [opt.flag] if value == _switched(opt, field) else []
        else:
            argv += [part for item in (value if opt.repeat else [value]) for part in (opt.flag, _text(item, opt))]
    return argv


def _argument(opt: Option, field: dataclasses.Field[Any], dest: str) -> dict[str, Any]:
    """``add_argument``'s keywords for a field's option."""
    default = _default(field)
    kind: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": _help(opt, default)}
    if default is MISSING:
        kind["required"] = True
    if _is_switch(opt, field):
        return kind | {"action": "store_const", "const": _switched(opt, field)}
    metavar = opt.metavar or (
        None if opt.choices else opt.flag.lstrip("-").upper().replace("-", "_") if opt.flag else None
    )
    kind |= {"type": _reader(opt, field), "metavar": metavar, "choices": opt.choices}
    return kind | ({"action": "append"} if opt.repeat else {})


def _is_switch(opt: Option, field: dataclasses.Field[Any]) -> bool:
    """The flag takes no value: it sets a constant, or turns a boolean from its default."""
    return opt.const is not None or isinstance(_default(field), bool)


def _switched(opt: Option, field: dataclasses.Field[Any]) -> Any:
    return opt.const if opt.const is not None else not _default(field)


def _options(cls: type) -> list[tuple[dataclasses.Field[Any], Option]]:
    return [(field, opt) for field in dataclasses.fields(cls) if (opt := field.metadata.get(OPTION)) is not None]


def _field(cls: type, name: str) -> dataclasses.Field[Any]:
    return next(field for field in dataclasses.fields(cls) if field.name == name)


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not MISSING:
        return field.default
    return field.default_factory() if field.default_factory is not MISSING else MISSING


def _text(value: Any, opt: Option) -> str:
    """A value as its flag's text: in the flag's unit, an enum by its value, a float without trailing zeros."""
    if isinstance(value, enum.Enum):
        value = value.value
    if opt.unit != 1:
        value = value / opt.unit
    return f"{value:g}" if isinstance(value, float) else str(value)


def _help(opt: Option, default: Any) -> str:
    text = opt.help
    if default not in (MISSING, None, "") and not isinstance(default, bool) and not opt.repeat:
        text += f" (default: {opt.show(default) if opt.show else _text(default, opt)})"
    return text.replace("%", "%%")  # argparse formats help with %


def _reader(opt: Option, field: dataclasses.Field[Any]) -> Callable[[str], Any]:
    """Reads a flag's text into the field's value; a ConfigError from ``parse`` becomes argparse's usage error."""
    parse = opt.parse or _TYPES.get(str(field.type).split(" |")[0].strip(), str)

    def read(text: str) -> Any:
        try:
            value = parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return int(value * opt.unit) if opt.unit != 1 else value

    read.__name__ = getattr(parse, "__name__", "value")  # argparse's "invalid int value: 'x'"
    return read


def section(parser: argparse.ArgumentParser, title: str | None) -> Any:
    """The parser's help section titled ``title`` (made on first use); the parser itself for None."""
    if title is None:
        return parser
    for group in parser._action_groups:  # argparse offers no lookup of its groups
        if group.title == title:
            return group
    return parser.add_argument_group(title)
