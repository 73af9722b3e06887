"""jsonargparse's parse errors as one line: the parameter, the value, what is allowed.

jsonargparse explains a rejected value over many lines (every Union member it tried, the
value's Python type, ...) and prints the whole usage block before it. The recipes' CLI reports
one line instead::

    --trainer.precision: got 17; allowed: 64, 32, 16, 'transformer-engine', ..., or null
    --clipping.max_norm: got -1.0; allowed: a finite number > 0
    --lr: expected one value (a negative number is written --lr=-1e-4)
    unrecognized arguments: --optimiser adamw (closest: --optimizer)
    --adam_to_sgd.to: unknown option of AdamToSGD; allowed: at_step, ..., min_steps; closest: --adam_to_sgd.nesterov
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Iterable

__all__ = ["one_line_parse_error"]

_KEY = re.compile(r'^Parser key "([^"]+)":\s*(.*)', re.DOTALL)
_GIVEN = re.compile(r"Given value: (.*)$", re.MULTILINE)
_GOT = re.compile(r"Expected a (.+?)\. Got value: (.*)$", re.MULTILINE)
_SUBTYPES = re.compile(r"Subtypes: \[(.*)\]$", re.MULTILINE)
# The callbacks' and registry's own messages: "max_norm: got -1.0; allowed: a number > 0".
_OWN_REASON = re.compile(r"^\s*-?\s*(\w+): got (.+?); allowed: (.+)$", re.MULTILINE)
_CLASS = re.compile(r"<class '([\w.]+)'>")
# A nested flag of a class-typed option that the class does not take (--adam_to_sgd.to).
_NOT_ACCEPTED = re.compile(
    r"Problem with given class_path '([\w.]+)':\s*Option '([^']+)' is not accepted"
)
_TYPE_WORDS = {
    "float": "a number",
    "int": "an integer",
    "str": "a string",
    "bool": "true or false",
    "NoneType": "null",
}


def _split_top_level(text: str) -> list[str]:
    """``"a, Literal[1, 2], b"`` → ``["a", "Literal[1, 2]", "b"]``."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += char in "[("
        depth -= char in "])"
        if char == "," and depth == 0:
            parts.append(text[start:index].strip())
            start = index + 1
    parts.append(text[start:].strip())
    return [part for part in parts if part]


def _describe_type(text: str) -> str:
    """A type as jsonargparse prints it, in the user's words."""
    text = text.strip()
    if text.startswith("typing.Literal[") and text.endswith("]"):
        return ", ".join(_split_top_level(text[len("typing.Literal[") : -1]))
    match = _CLASS.fullmatch(text)
    if match:
        name = match.group(1).rsplit(".", 1)[-1]
        return _TYPE_WORDS.get(name, f"a {name}")
    return text


def _join(choices: list[str]) -> str:
    return choices[0] if len(choices) == 1 else f"{', '.join(choices[:-1])}, or {choices[-1]}"


def _closest_flag(message: str, flags: Iterable[str]) -> str:
    unknown = [token.split("=", 1)[0] for token in message.split() if token.startswith("--")]
    for token in unknown:
        match = difflib.get_close_matches(token, list(flags), n=1, cutoff=0.6)
        if match:
            return f"{message} (closest: {match[0]})"
    return message


def _init_options(class_path: str) -> list[str]:
    """The keyword arguments ``class_path``'s ``__init__`` takes (none if it does not import)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.kind in kinds and p.name != "self"]


def _unknown_nested_option(key: str, class_path: str, option: str) -> str:
    options = _init_options(class_path)
    line = f"--{key}.{option}: unknown option of {class_path.rsplit('.', 1)[-1]}"
    if options:
        line += f"; allowed: {', '.join(options)}"
        match = difflib.get_close_matches(option, options, n=1, cutoff=0.4)
        if match:
            line += f"; closest: --{key}.{match[0]}"
    return line


def one_line_parse_error(message: str, flags: Iterable[str] = ()) -> str:
    """One line for a jsonargparse/argparse error ``message``; ``flags`` are the parser's
    option strings, for the closest name to an unrecognized one."""
    message = message.strip()
    if message.startswith("unrecognized arguments:"):
        return _closest_flag(message.splitlines()[0], flags)
    expected_one = re.match(r"argument (--[\w.]+): expected one argument", message)
    if expected_one:
        flag = expected_one.group(1)
        return f"{flag}: expected one value (a negative number is written {flag}=-1e-4)"
    match = _KEY.match(message)
    if not match:
        return message.splitlines()[0] if message else "invalid arguments"
    key, detail = match.group(1), match.group(2)
    not_accepted = _NOT_ACCEPTED.search(detail)
    if not_accepted:  # before the callback's reasons: jsonargparse tried no value yet
        return _unknown_nested_option(key, not_accepted.group(1), not_accepted.group(2))
    own = _OWN_REASON.search(detail)
    if own:  # a callback's or the registry's own check said why
        return f"--{key}.{own.group(1)}: got {own.group(2)}; allowed: {own.group(3)}"
    got = _GOT.search(detail)
    if got:
        return f"--{key}: got {got.group(2)}; allowed: {_describe_type(got.group(1))}"
    given = _GIVEN.search(detail)
    subtypes = _SUBTYPES.search(detail)
    if given and subtypes:
        allowed = [_describe_type(part) for part in _split_top_level(subtypes.group(1))]
        return f"--{key}: got {given.group(1)}; allowed: {_join(allowed)}"
    return f"--{key}: {detail.splitlines()[0].strip()}"
