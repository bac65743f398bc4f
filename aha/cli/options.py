"""Flags generated from settings dataclasses: every ``aha`` command is built the same way.

A settings field with help metadata (declared with :func:`aha._fields.option`, or
:func:`aha.hf.settings.routing_field`) is a flag: ``seq_len`` -> ``--seq-len`` unless the field
names its flag; the help is the field's followed by the dataclass default. A flag left out
arrives as ``None`` ("not given") and is not passed on, so the settings' own default (or a
``--config`` file's value, or a quick preset's) applies. Sequence fields (``Sequence[int]``,
``list[float]``, ``Sequence[str]``, ...) take comma-separated values and may be repeated
(``--data a,b --data c``); bool fields are ``--x/--no-x``.

    @app.command("eval")
    @with_flags(flags(EvalSettings))
    def eval_command(model: Annotated[str, typer.Option(help=...)] = "smollm2-135m", **given): ...

The command's own parameters are its few command-only flags; ``given`` holds the parsed values
of the generated flags that were given on the command line.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import typer

_SEQUENCES = (list, tuple, collections.abc.Sequence)


def config_file(help: str) -> Any:
    """The ``--config``/``-c`` option (an existing file) of commands that read a training recipe."""
    return typer.Option("--config", "-c", help=help, exists=True, dir_okay=False)


def _without_none(hint: Any) -> Any:
    """``X`` for ``X | None``, else ``hint``."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 else hint


def _item_name(item: Any) -> str:
    if typing.get_origin(item) is Literal:
        return "|".join(map(str, typing.get_args(item)))
    return getattr(item, "__name__", str(item))


def _item_parser(item: Any, flag: str) -> Callable[[str], Any]:
    """Text -> one value of a sequence flag, or a :class:`typer.BadParameter` naming the flag."""
    if typing.get_origin(item) is Literal:
        choices = typing.get_args(item)

        def choice(text: str) -> Any:
            if text not in choices:
                raise typer.BadParameter(f"{flag} got {text!r}; choose from {', '.join(map(str, choices))}")
            return text

        return choice
    if item in (int, float):
        kind, example = ("integers", "512,1024") if item is int else ("numbers", "0.1,0.5,0.9")

        def number(text: str) -> Any:
            try:
                return item(text)
            except ValueError:
                raise typer.BadParameter(f"{flag} takes comma-separated {kind}, e.g. {example}, got {text!r}") from None

        return number
    return str


@dataclass(frozen=True)
class Flag:
    """One settings field as a command-line flag."""

    name: str  #: the field's name, the command's keyword
    flag: str  #: ``--seq-len``
    hint: Any  #: the field's type
    help: str
    default: Any
    parse: Callable[[str], Any] | None = None

    @property
    def item(self) -> Any:
        """The item type of a sequence field."""
        return typing.get_args(_without_none(self.hint))[0]

    @property
    def sequence(self) -> type | None:
        """``list`` or ``tuple`` (the value's type) for a sequence field, else None."""
        origin = typing.get_origin(_without_none(self.hint))
        return None if origin not in _SEQUENCES else (list if origin is list else tuple)

    def parameter(self) -> inspect.Parameter:
        """A keyword parameter whose default is a ``typer.Option`` with ``None`` meaning "not given"."""
        decls, metavar = [self.flag], None
        if self.parse is not None:
            annotation: Any = str | None
        elif self.sequence is not None:
            annotation, metavar = list[str] | None, f"<{_item_name(self.item)},...>"
        elif self.hint is bool:
            annotation, decls = bool | None, [f"{self.flag}/--no-{self.flag.removeprefix('--')}"]
        else:
            annotation = self.hint if type(None) in typing.get_args(self.hint) else self.hint | None
        help_text = self.help
        if self.default is not None:
            shown = ",".join(map(str, self.default)) if isinstance(self.default, (list, tuple)) else self.default
            help_text += f" (default: {shown})"
        option = typer.Option(None, *decls, help=help_text, metavar=metavar)
        return inspect.Parameter(self.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)

    def value(self, raw: Any) -> Any:
        """The field's value from what typer parsed (comma-separated items split, items converted)."""
        if self.parse is not None:
            try:
                return self.parse(raw)
            except ValueError as error:
                raise typer.BadParameter(f"{self.flag}: {error}") from None
        if self.sequence is None:
            return raw
        item = _item_parser(self.item, self.flag)
        values = [item(part.strip()) for text in raw for part in text.split(",") if part.strip()]
        if not values:
            raise typer.BadParameter(f"{self.flag} needs at least one value")
        return self.sequence(values)


def flags(settings: type, only: Iterable[str] | None = None, help: Mapping[str, str] | None = None) -> list[Flag]:
    """The flags of a settings dataclass: its fields with help metadata, in declaration order
    (``only``: just these fields; ``help``: these fields' help as this command states it)."""
    hints = typing.get_type_hints(settings)
    wanted = None if only is None else set(only)
    result = []
    for field in dataclasses.fields(settings):
        if "help" not in field.metadata or (wanted is not None and field.name not in wanted):
            continue
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        result.append(Flag(
            name=field.name,
            flag=field.metadata.get("flag", "--" + field.name.replace("_", "-")),
            hint=hints[field.name],
            help=(help or {}).get(field.name, field.metadata["help"]),
            default=None if default is dataclasses.MISSING else default,
            parse=field.metadata.get("parse"),
        ))  # fmt: skip
    missing = (wanted or set()) - {f.name for f in result}
    if missing:
        raise TypeError(f"{settings.__name__} has no flag field(s) {sorted(missing)}")
    return result


def with_flags(*groups: Sequence[Flag]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator of a command: its own parameters (the command-only flags) plus one flag per
    :class:`Flag` of ``groups``; the command receives the generated flags that were given,
    parsed, as keyword arguments (its ``**given``)."""
    generated = [flag for group in groups for flag in group]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in inspect.signature(command, eval_str=True).parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        names = [p.name for p in own] + [f.name for f in generated]
        clashes = sorted({n for n in names if names.count(n) > 1})
        if clashes:
            raise TypeError(f"{command.__name__}: more than one flag named {clashes}")

        @functools.wraps(command)
        def run(**arguments: Any) -> Any:
            given = {}
            for flag in generated:
                raw = arguments.pop(flag.name)
                if raw not in (None, [], ()):  # an absent repeatable flag may arrive as an empty list
                    given[flag.name] = flag.value(raw)
            return command(**arguments, **given)

        run.__signature__ = inspect.Signature([*own, *(f.parameter() for f in generated)])  # type: ignore[attr-defined]
        return run

    return decorate


__all__ = ["Flag", "config_file", "flags", "with_flags"]
