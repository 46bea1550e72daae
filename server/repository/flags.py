"""Command-line flags derived from a typed options object, one flag per field.

The one rule by which ``resnet-serve serve`` (`server.config.Settings`) and
``resnet-serve build`` (`builder.options.BuildOptions`) get their flags: field ``max_lr``
becomes ``--max-lr``; a bool becomes ``--x/--no-x``; a Literal or an Enum offers its values
as choices; a ``list[T]`` is a repeatable flag, each use one element; the help text is the
field's description. Every flag defaults to "not given",
so a flag left out leaves the field to the model (its default, or an env var where the
model reads them). Constraints (``ge``, validators) are checked when the object is built.

Where the derived form does not fit, a field carries a :class:`Flag` in its metadata:
``Annotated[str, Flag(positional=True)]``.
"""

from __future__ import annotations

import argparse
import enum
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

HelpNote = Callable[[str, FieldInfo], str]


@dataclass(frozen=True)
class Flag:
    """How one field appears on the command line, where the derived form does not fit."""

    name: str | None = None  # the flag ("--input") instead of the field's name
    positional: bool = False  # an argument, not a flag: its metavar is the field's name
    metavar: str | None = None
    const: Any = None  # the value of the bare flag: makes the flag's value optional
    read: Callable[[str], Any] | None = None  # the text to a value (may raise ArgumentTypeError)


def flag_of(field: FieldInfo) -> Flag:
    return next((m for m in field.metadata if isinstance(m, Flag)), Flag())


def flag_name(name: str, field: FieldInfo) -> str:
    """``--kebab-case`` of the field's name, or its :class:`Flag`'s name."""
    flag = flag_of(field)
    if flag.positional:
        return name
    return flag.name or "--" + name.replace("_", "-")


def _scalar(annotation: Any) -> tuple[Callable[[str], Any], tuple[Any, ...] | None]:
    """What argparse converts the text with, and the allowed choices (Literal, Enum)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), choices
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return str, tuple(member.value for member in annotation)
    return annotation, None


def _no_note(_: str, __: FieldInfo) -> str:
    return ""


def add_arguments(
    parser: argparse.ArgumentParser, model: type[BaseModel], note: HelpNote = _no_note
) -> None:
    """One flag per field of ``model``, in field order; ``note`` adds to each help text."""
    for name, field in model.model_fields.items():
        flag = flag_of(field)
        help_text = f"{field.description or ''}{note(name, field)}"
        if flag.positional:
            kind = flag.read or _scalar(field.annotation)[0]
            parser.add_argument(name, type=kind, help=help_text)
            continue
        options: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
        if field.annotation is bool:
            parser.add_argument(
                flag_name(name, field), action=argparse.BooleanOptionalAction, **options
            )
            continue
        kind, choices = _scalar(field.annotation)
        if typing.get_origin(field.annotation) is list:  # repeatable: each use adds one
            (element,) = typing.get_args(field.annotation)
            kind, choices = _scalar(element)
            options["action"] = "append"
        if flag.read is not None:
            kind = flag.read
        if flag.const is not None:
            options |= {"nargs": "?", "const": flag.const}
        parser.add_argument(
            flag_name(name, field),
            type=kind,
            choices=choices,
            metavar=flag.metavar,
            **options,
        )


def given(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The fields of ``model`` that the command line set: ``model(**given(args, model))``."""
    return {
        name: getattr(args, name)
        for name in model.model_fields
        if getattr(args, name, None) is not None
    }
