"""Options declared once: a dataclass field carries its help text, bounds and choices.

Every config dataclass a command takes options from (a method's fit config, its ``shard``
options, the ``shard`` run itself) declares its fields with :func:`option`. The command line
is built from these fields (``uge_protect.cli.options``), and :func:`check_options` checks the
bounds and choices they state, so a default, a help text or a range is written in one place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from uge_protect.errors import UserError

#: The key of an option's :class:`OptionSpec` in its field's metadata.
SPEC_KEY = "uge_protect.option"

#: The L∞ budget every method and ``shard`` defaults to (in [0, 1] image units).
DEFAULT_EPSILON = 8 / 255


@dataclass(frozen=True)
class OptionSpec:
    """What the command line and the generic checks know of one option.

    ``min``/``max`` bound a number (``min_open``/``max_open``: the bound itself is refused);
    ``choices`` are the values a field takes. ``label`` names the option in error messages
    (default: the field name with spaces), ``reason`` is added to a bound's message.
    ``default_help`` describes a default the value alone does not say (one that depends on
    other options, or None). ``flag`` is the option's command-line name (default
    ``--field-name``; for a bool ``--on/--off``). ``cli`` False: Python API only.
    ``required``: the command line asks for it even though the dataclass has a default.
    ``passed``: the command line always passes its value (default included), e.g. because it
    is part of a fit's identity; other options pass only what was given. ``modes``: the modes
    that use the option, for the help of a command over several configs (default: the modes
    of the configs that have it). ``repeatable``: a list given by repeating the option (else
    a list of names is given as one text, see ``cli.common.class_names_option``).
    """

    help: str
    flag: str | None = None
    short: str | None = None
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    choices: tuple[Any, ...] | None = None
    label: str | None = None
    reason: str = ""
    default_help: str | None = None
    cli: bool = True
    required: bool = False
    passed: bool = False
    modes: str | None = None
    repeatable: bool = False


def option(default: Any = dataclasses.MISSING, *, help: str, factory: Callable[[], Any] | None = None,
           **spec: Any) -> Any:
    """A dataclass field with ``default`` (or ``factory``) whose metadata holds an
    :class:`OptionSpec` built from ``help`` and ``spec`` (its other fields)."""
    if "choices" in spec and spec["choices"] is not None:
        spec["choices"] = tuple(spec["choices"])
    metadata = {SPEC_KEY: OptionSpec(help=help, **spec)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def epsilon_option() -> Any:
    """The ``epsilon`` field every method shares (always passed: artifacts compare it)."""
    return option(DEFAULT_EPSILON, help="L∞ budget in [0,1] image units.", passed=True)


def device_option() -> Any:
    """The ``device`` field of every fit."""
    return option("auto", help="auto (CUDA when available), cpu, cuda, cuda:N.", passed=True)


def seed_option(help: str) -> Any:
    """The ``seed`` field of a fit, with its own ``help``."""
    return option(0, help=help, passed=True)


def image_size_option() -> Any:
    """The ``image_size`` field of a fit (informational in its config: the fit brings the images to it)."""
    return option(None, help="Centre-crop training images to this side first.", default_help="as stored", min=1)


def spec_of(field: dataclasses.Field) -> OptionSpec | None:
    """The :class:`OptionSpec` of ``field``, or None for a field not made by :func:`option`."""
    return field.metadata.get(SPEC_KEY)


def option_fields(cls: type) -> Iterator[tuple[dataclasses.Field, OptionSpec]]:
    """The fields of dataclass ``cls`` made by :func:`option`, with their specs."""
    for field in dataclasses.fields(cls):
        spec = spec_of(field)
        if spec is not None:
            yield field, spec


def help_of(cls: type, name: str) -> str:
    """The help text of option field ``name`` of dataclass ``cls``."""
    spec = spec_of(cls.__dataclass_fields__[name])
    if spec is None:
        raise KeyError(f"{cls.__name__}.{name} is not an option field")
    return spec.help


def label_of(field: dataclasses.Field, spec: OptionSpec) -> str:
    """How messages name the option of ``field``."""
    return spec.label or field.name.replace("_", " ")


def field_default(field: dataclasses.Field) -> Any:
    """The default value of ``field`` (its factory's value; MISSING when it has none)."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def format_value(value: Any) -> str:
    """A default as help shows it: ``8/255`` for budgets in uint8 levels, ``on``/``off`` for bools."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and 0 < value < 1 and len(repr(value)) > 8:
        levels = round(value * 255, 1)
        if abs(value * 255 - levels) < 1e-9:
            return f"{levels:g}/255"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def default_text(field: dataclasses.Field, spec: OptionSpec) -> str:
    """The default of ``field`` in words: its ``default_help``, else its value."""
    if spec.default_help is not None:
        return spec.default_help
    return format_value(field_default(field))


def or_list(values: Sequence[Any]) -> str:
    """``a, b or c``."""
    shown = [str(v) for v in values]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"


def check_choice(label: str, value: Any, choices: Sequence[Any]) -> None:
    """A :class:`UserError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise UserError(f"unknown {label} {value!r}; choose {or_list(choices)}")


def check_bounds(label: str, value: Any, spec: OptionSpec) -> None:
    """A :class:`UserError` unless the number ``value`` is within the bounds of ``spec``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    low_ok = spec.min is None or (value > spec.min if spec.min_open else value >= spec.min)
    high_ok = spec.max is None or (value < spec.max if spec.max_open else value <= spec.max)
    if low_ok and high_ok:
        return
    if spec.min is not None and spec.max is not None:
        span = f"in {'(' if spec.min_open else '['}{spec.min}, {spec.max}{')' if spec.max_open else ']'}"
    elif spec.min is not None:
        span = f"{'>' if spec.min_open else '>='} {spec.min}"
    else:
        span = f"{'<' if spec.max_open else '<='} {spec.max}"
    raise UserError(f"{label} must be {span}{spec.reason}, got {value}")


def check_options(config: Any) -> None:
    """Check every option field of the dataclass instance ``config`` against the choices and
    bounds its metadata states (None values are not checked: None means "default")."""
    for field, spec in option_fields(type(config)):
        value = getattr(config, field.name)
        if value is None:
            continue
        if spec.choices is not None:
            check_choice(label_of(field, spec), value, spec.choices)
        check_bounds(label_of(field, spec), value, spec)
