"""Typer options built from config dataclasses, so each option's help and default are written once.

A command's options come from the option fields (:func:`uge_protect.options.option`) of one
or more dataclasses (a command over several, such as ``fit em``'s modes, takes their union).
Every option's typer default is None ("not given"), except for fields marked ``passed`` and
plain flags (``--overwrite``: False when absent), whose default is the dataclass's; the help says the dataclass default (or its
``default_help``) once. :func:`command_with_options` builds the command function with an
:class:`inspect.Signature` that typer reads, and hands the command's body the options as
the dict the library takes (None: not given).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import typer

from uge_protect.cli.common import class_names_option
from uge_protect.options import OptionSpec, default_text, field_default, option_fields

#: (dataclass, label): the label names the modes or methods that use the dataclass's
#: options, in the help of an option not every source of a command has.
Source = tuple[type, Optional[str]]


@dataclass(frozen=True)
class CliOption:
    """One command-line option built from a dataclass field."""

    name: str
    parameter: inspect.Parameter
    #: Turns a given command-line value into the field's value (None: kept as given).
    parse: Callable[[Any], Any] | None
    spec: OptionSpec
    #: The field's default: what the option passes when absent, if ``passed``.
    default: Any
    #: Whether the option passes its default when absent (else None: not given).
    passed: bool


@dataclass(frozen=True)
class _Entry:
    label: str | None
    field: dataclasses.Field
    spec: OptionSpec
    hint: Any


def cli_options(*sources: Source) -> list[CliOption]:
    """The command-line options of the option fields (``cli`` true) of ``sources``, in field
    order; a field several sources have is one option."""
    entries: dict[str, list[_Entry]] = {}
    for cls, label in sources:
        hints = typing.get_type_hints(cls)
        for field, spec in option_fields(cls):
            if spec.cli:
                entries.setdefault(field.name, []).append(_Entry(label, field, spec, hints[field.name]))
    return [_cli_option(name, found, len(sources)) for name, found in entries.items()]


def _cli_option(name: str, entries: list[_Entry], n_sources: int) -> CliOption:
    first = entries[0]
    spec, kind, parse = first.spec, *_cli_type(first.hint, first.spec.repeatable)
    flags = [spec.flag or (f"--{_dashed(name)}/--no-{_dashed(name)}" if kind is bool else f"--{_dashed(name)}")]
    if spec.short:
        flags.append(spec.short)
    labels = [e.label for e in entries if e.label]
    prefix = spec.modes or ("/".join(labels) if labels and len(entries) < n_sources else None)
    text = f"{prefix}: {_lower_first(spec.help)}" if prefix else spec.help
    # a plain flag (no --off form) is False when absent, so it passes its default
    passed = spec.passed or (kind is bool and "/" not in flags[0])
    required = spec.required or field_default(first.field) is dataclasses.MISSING
    if required:
        default: Any = ...
    else:
        default = field_default(first.field) if passed else None
        text += f" (default: {_default_shown(entries)})"
    annotation = kind if required or passed else Optional[kind]
    element = typing.get_args(kind)[0] if typing.get_origin(kind) is list else None
    info = typer.Option(default, *flags, help=text, show_default=False,
                        metavar=f"<{element.__name__}>" if element else None)
    parameter = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)
    return CliOption(name, parameter, parse, spec, field_default(first.field), passed)


def _default_shown(entries: list[_Entry]) -> str:
    """The default in words; for several sources with different defaults, each with its label."""
    texts = [default_text(e.field, e.spec) for e in entries]
    if entries[0].spec.passed or len(set(texts)) == 1:
        return texts[0]
    return "; ".join(t if e.spec.default_help is not None or not e.label else f"{t} {e.label}"
                     for t, e in zip(texts, entries))


def _cli_type(hint: Any, repeatable: bool = False) -> tuple[Any, Callable[[Any], Any] | None]:
    """The command-line type of a field annotated ``hint`` (its first non-None type) and the
    parser of its given value: a list is given by repeating the option when ``repeatable``,
    else a list of names is given as text (see :func:`class_names_option`)."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    first = next(a for a in args if a is not type(None))
    if typing.get_origin(first) is list:
        if repeatable:
            return typing.List[typing.get_args(first)[0]], list
        return str, class_names_option
    if first in (bool, int, float, str):
        return first, None
    raise TypeError(f"no command-line type for {hint!r}")


def _lower_first(text: str) -> str:
    """``text`` with a capitalised first word in lower case (``PGD``, ``L_fd`` stay)."""
    return text[0].lower() + text[1:] if len(text) > 1 and text[1].islower() else text


def _dashed(name: str) -> str:
    return name.replace("_", "-")


def parameter(name: str, annotation: Any, info: Any) -> inspect.Parameter:
    """A command parameter ``name`` written by hand (typer ``Argument``/``Option`` ``info``)."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)


def command_with_options(body: Callable[..., None], fixed: Sequence[inspect.Parameter],
                         options: Sequence[CliOption], doc: str, tail: Sequence[inspect.Parameter] = ()
                         ) -> Callable[..., None]:
    """A typer command taking the ``fixed`` parameters, the ``options`` and the ``tail``
    parameters; it calls ``body(values, **others)``, where ``values`` maps each option to what
    was given (None: not given) and ``others`` are the other parameters."""
    names = [o.name for o in options]

    def command(**kwargs: Any) -> None:
        body({name: kwargs.pop(name) for name in names}, **kwargs)

    command.__signature__ = inspect.Signature([*fixed, *(o.parameter for o in options), *tail])  # type: ignore[attr-defined]
    command.__doc__ = doc
    return command


def given_values(options: Sequence[CliOption], values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with each given one parsed into its field's value (a list of names from its
    text, ...); a :class:`UserError` for a value that does not parse."""
    parsers = {o.name: o.parse for o in options}
    return {k: parsers[k](v) if v is not None and parsers.get(k) else v for k, v in values.items()}
