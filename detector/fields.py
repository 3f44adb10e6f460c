"""Field validation for config dataclasses: types from the annotations, ranges and choices declared once.

A config class lists what its fields allow in one ``RULES`` mapping (field name -> :class:`Rule`)
and calls :func:`check_fields` from ``__post_init__``. Every field is then checked by type as
well as by range: an ``int`` field takes ints (not floats, not bools, not strings), a ``float``
field takes finite numbers, a ``tuple[float, ...]`` takes a list or tuple of numbers, a bare
number where a variable-length tuple is expected becomes a one-element tuple. Values are stored
normalised (lists -> tuples, ints -> floats for float fields, numpy scalars -> Python numbers).

Command-line ``KEY=VALUE`` strings go through :func:`parse_value` / :func:`parse_assignments`,
which parse the text as the field's type (``topk=2.5``, ``topk=true`` and ``topk=abc`` are
errors, ``aspect_ratios=0.5,1,2`` is a tuple) and then apply the same checks.

Every error is a :class:`FieldError` (a ``ValueError``) naming the class and field, the value
given and what is allowed, e.g. ``DetectorConfig.topk=2.5: expected an int >= 1, got a float``.
Checks between fields (``centerness`` needs ``in_gt_box``) stay with the config class.

The functions also take a function in place of a class: its keyword parameters are the fields
(``parse_assignments(build_train_config, ["iterations=abc"], "--train-set")``), with rules from
the function's ``RULES`` attribute when it has one.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["FieldError", "UnknownFieldError", "Rule", "check_fields", "check_value", "check_keys", "parse_value",
           "parse_assignments", "coerce_fields", "field_names", "describe"]

BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True,
              "false": False, "no": False, "off": False, "0": False}
NONE_WORDS = ("none", "null", "")


class FieldError(ValueError):
    """A field got a value it does not allow.

    ``owner`` (class name), ``field``, ``value`` (as given), ``allowed`` (what the field takes)
    and ``got`` (what was wrong, e.g. "a float"; may be empty) are attributes. When the value
    came from a command-line option, ``option`` and ``text`` name it.
    """

    def __init__(self, owner: str, field: str, value: Any, allowed: str, got: str = "",
                 option: Optional[str] = None, text: Optional[str] = None, where: str = ""):
        self.owner, self.field, self.value, self.allowed, self.got = owner, field, value, allowed, got
        self.option, self.text, self.where = option, text, where
        super().__init__(str(self))

    def __str__(self) -> str:
        return (f"{self.where}: " if self.where else "") + self.describe()

    def describe(self) -> str:
        tail = f", got {self.got}" if self.got else ""
        if self.option is not None and not self.field:  # the item itself is malformed
            return f"{self.option} {self.text}: expected {self.allowed}"
        if self.option is not None:
            return f"{self.option} {self.text}: {self.owner}.{self.field} expects {self.allowed}{tail}"
        return f"{self.owner}.{self.field}={self.value!r}: expected {self.allowed}{tail}"

    def _parts(self) -> tuple:
        return (self.owner, self.field, self.value, self.allowed, self.got, self.option, self.text, self.where)

    def from_option(self, option: str, text: str) -> "FieldError":
        """The same error, reported as coming from ``option`` given as ``text`` (``"topk=abc"``)."""
        return type(self)(*self._parts()[:5], option, text, self.where)

    def within(self, where: str) -> "FieldError":
        """The same error inside an enclosing setting (``"TrainConfig.detector"``), named first."""
        return type(self)(*self._parts()[:7], f"{where}: {self.where}" if self.where else where)

    def __reduce__(self):  # picklable across Ray/multiprocessing with all its parts
        return (type(self), self._parts())


class UnknownFieldError(FieldError):
    """A name that is not a field of the config class (``allowed`` lists the fields)."""

    def describe(self) -> str:
        where = f"{self.option} {self.text}: " if self.option is not None else ""
        if isinstance(self.value, list) and len(self.value) > 1:
            return f"{where}{self.owner} has no fields {', '.join(map(repr, self.value))}; {self.allowed}"
        return f"{where}{self.owner} has no field {self.field!r}; {self.allowed}"


@dataclass(frozen=True)
class Rule:
    """What a field allows beyond its annotated type.

    ``ge``/``gt``/``le``/``lt``: bounds of a number, or of every item of a tuple.
    ``choices``: the allowed values (of the field, or of every item of a tuple).
    ``nonempty``: a tuple needs at least one item.
    ``token``: parses one command-line token of an item (e.g. ``"1:2"`` -> 0.5 for aspect ratios);
    it raises ``ValueError`` for text it does not take.
    ``valid``: a test of the whole (typed, non-None) value for what bounds cannot say (a pattern);
    give ``allowed`` with it.
    ``allowed``: a description that replaces the generated one.
    """

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    choices: Optional[tuple] = None
    nonempty: bool = False
    token: Optional[Callable[[str], Any]] = None
    valid: Optional[Callable[[Any], bool]] = None
    allowed: Optional[str] = None

    def bounds_text(self) -> str:
        lo = (f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None)
        hi = (f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None)
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return f"{'>=' if self.ge is not None else '>'} {lo[1:]}"
        if hi:
            return f"{'<=' if self.le is not None else '<'} {hi[:-1]}"
        return ""

    def in_bounds(self, x: Any) -> bool:
        return not ((self.ge is not None and not x >= self.ge) or (self.gt is not None and not x > self.gt)
                    or (self.le is not None and not x <= self.le) or (self.lt is not None and not x < self.lt))


NO_RULE = Rule()


class _Mismatch(Exception):
    """Internal signal: the value does not have the annotated type; ``got`` says what it has."""

    def __init__(self, got: str):
        self.got = got


# ---------------------------------------------------------------------- type descriptions
def _type_text(hint: Any, plural: bool = False) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return "booleans (true/false)" if plural else "true or false"
    if hint is int:
        return "ints" if plural else "an int"
    if hint is float:
        return "numbers" if plural else "a number"
    if hint is str:
        return "strings" if plural else "a string"
    if hint is type(None):
        return "None"
    if hint is Any:
        return "values" if plural else "any value"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_type_text(a, plural) for a in args))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} {_type_text(args[0], plural=True)}"
        return f"a list of {_type_text(args[0], plural=True) if args else 'values'}"
    if origin in (dict, Mapping) or hint is dict:
        return "mappings" if plural else "a mapping"
    name = getattr(hint, "__name__", str(hint))
    return f"{name} objects" if plural else f"a {name}"


def _allowed(hint: Any, rule: Rule) -> str:
    if rule.allowed:
        return rule.allowed
    if type(None) in _arms(hint) and len(_arms(hint)) > 1 and rule.choices is None:
        return f"{_allowed(_strip_none(hint), rule)} or None"  # "an int >= 1 or None"
    if rule.choices is not None:
        choices = "one of " + ", ".join(repr(c) for c in rule.choices)
        item = _item_hint(hint)
        return choices if item is None else f"{_type_text(_strip_none(hint))} whose items are each {choices}"
    text = _type_text(hint)
    if rule.nonempty:
        text = text.replace("a list of", "a non-empty list of", 1)
    bounds = rule.bounds_text()
    if bounds:
        text += f", each {bounds}" if _item_hint(hint) is not None and not _scalar_hint(hint) else f" {bounds}"
    return text


def describe(cls: type, name: str) -> str:
    """What field ``name`` of config class ``cls`` allows, as the error messages say it."""
    return _allowed(_hints(cls)[name], _rules(cls).get(name, NO_RULE))


# ---------------------------------------------------------------------- type checks
def _strip_none(hint: Any) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        return rest[0] if len(rest) == 1 else typing.Union[rest]
    return hint


def _item_hint(hint: Any) -> Any:
    """The item type of a tuple field (or of the tuple arm of a union), else None."""
    for arm in _arms(hint):
        if typing.get_origin(arm) in (tuple, list):
            args = typing.get_args(arm)
            return args[0] if args else Any
    return None


def _scalar_hint(hint: Any) -> bool:
    return any(typing.get_origin(a) not in (tuple, list) and a is not type(None) for a in _arms(hint))


def _arms(hint: Any) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, numbers.Integral):
        return "an int"
    if isinstance(value, numbers.Real):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "None"
    return f"a {type(value).__name__}"


def _convert(hint: Any, value: Any) -> Any:
    """``value`` as the annotated type (normalised), or :class:`_Mismatch`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch(_kind(value))
    if hint is bool:
        if isinstance(value, bool) or type(value).__name__ == "bool_":  # numpy.bool_
            return bool(value)
        raise _Mismatch(_kind(value))
    if hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        raise _Mismatch(_kind(value))
    if hint is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = float(value)
            if not math.isfinite(value):
                raise _Mismatch("a non-finite number")
            return value
        raise _Mismatch(_kind(value))
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch(_kind(value))
    if origin in (typing.Union, types.UnionType):
        # Scalars before tuples so that a number for ``int | tuple[int, int]`` stays a number.
        for arm in sorted(args, key=lambda a: typing.get_origin(a) in (tuple, list)):
            try:
                return _convert(arm, value)
            except _Mismatch:
                continue
        raise _Mismatch(_kind(value))
    if origin is typing.Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise _Mismatch(repr(value))
    if origin in (tuple, list):
        fixed = origin is tuple and args and args[-1] is not Ellipsis
        item = args[0] if args else Any
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
            if fixed or isinstance(value, (str, bytes, Mapping)):
                raise _Mismatch(_kind(value))
            value = (value,)  # one number where a variable-length tuple is expected
        items = list(value)
        if fixed and len(items) != len(args):
            raise _Mismatch(f"{len(items)} item(s)")
        out = []
        for i, x in enumerate(items):
            try:
                out.append(_convert(args[i] if fixed else item, x))
            except _Mismatch as e:
                raise _Mismatch(f"item {i} {x!r} ({e.got})") from None
        return tuple(out) if origin is tuple else out
    if origin in (dict, Mapping) or hint is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise _Mismatch(_kind(value))
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _Mismatch(_kind(value))
    return value  # an annotation this module does not interpret


def _check_rule(rule: Rule, hint: Any, value: Any) -> Optional[str]:
    """None when ``value`` (already of the right type) satisfies ``rule``, else what is wrong."""
    if value is None:
        return None
    if rule.valid is not None and not rule.valid(value):
        return ""
    items = value if isinstance(value, (tuple, list)) else (value,)
    if rule.nonempty and isinstance(value, (tuple, list)) and not value:
        return "an empty list"
    for x in items:
        if rule.choices is not None and x not in rule.choices:
            return ""
        if isinstance(x, numbers.Real) and not isinstance(x, bool) and not rule.in_bounds(x):
            return ""
    return None


# ---------------------------------------------------------------------- public checks
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: Any) -> dict[str, Any]:
    """Field -> annotation of a dataclass, or keyword parameter -> annotation of a function."""
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls)
        if dataclasses.is_dataclass(cls):
            _HINTS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
        else:
            _HINTS[cls] = {n: hints.get(n, Any) for n, p in inspect.signature(cls).parameters.items()
                           if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return _HINTS[cls]


def _rules(cls: Any) -> Mapping[str, Rule]:
    return getattr(cls, "RULES", {})


def field_names(cls: Any) -> list[str]:
    """The dataclass fields of ``cls`` in declaration order (or a function's keyword parameters)."""
    return list(_hints(cls))


def check_value(cls: type, name: str, value: Any) -> Any:
    """``value`` checked against field ``name`` of ``cls`` (type, then ``cls.RULES[name]``), normalised.

    Raises :class:`FieldError` naming the field, the value and what is allowed.
    """
    hint, rule = _hints(cls)[name], _rules(cls).get(name, NO_RULE)
    try:
        out = _convert(hint, value)
    except _Mismatch as e:
        raise FieldError(cls.__name__, name, value, _allowed(hint, rule), e.got) from None
    problem = _check_rule(rule, hint, out)
    if problem is not None:
        raise FieldError(cls.__name__, name, value, _allowed(hint, rule), problem)
    return out


def check_fields(obj: Any) -> None:
    """Check and normalise every field of dataclass instance ``obj`` in place (frozen ones too).

    Call it first thing in ``__post_init__``; the first bad field raises :class:`FieldError`.
    """
    cls = type(obj)
    for name in _hints(cls):
        value = check_value(cls, name, getattr(obj, name))
        object.__setattr__(obj, name, value)


def check_keys(cls: type, keys: Iterable[str]) -> None:
    """Raise ``FieldError`` when ``keys`` holds a name that is not a field of ``cls``."""
    known = field_names(cls)
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise UnknownFieldError(cls.__name__, unknown[0], unknown, f"known fields: {', '.join(known)}")


# ---------------------------------------------------------------------- text (command line, YAML strings)
_SPLIT = re.compile(r"[,/\s]+")
_INT = re.compile(r"[+-]?\d+")


def _parse_scalar(hint: Any, text: str, token: Optional[Callable[[str], Any]]) -> Any:
    t = text.strip()
    if token is not None and hint is not str:
        try:
            return token(t)
        except ValueError:
            raise _Mismatch(repr(text)) from None
    if hint is bool:
        if t.lower() in BOOL_WORDS:
            return BOOL_WORDS[t.lower()]
        raise _Mismatch(repr(text))
    if hint is int:
        if _INT.fullmatch(t):
            return int(t)
        raise _Mismatch(repr(text))
    if hint is float:
        try:
            value = float(t)
        except ValueError:
            raise _Mismatch(repr(text)) from None
        if not math.isfinite(value):
            raise _Mismatch(repr(text))
        return value
    if hint is str or hint is Any:
        if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'":
            return t[1:-1]  # a quoted string (JSON/YAML style): the quotes are not part of the value
        return text
    if hint is type(None):
        if t.lower() in NONE_WORDS:
            return None
        raise _Mismatch(repr(text))
    if typing.get_origin(hint) is typing.Literal:
        for a in typing.get_args(hint):
            if str(a) == t:
                return a
        raise _Mismatch(repr(text))
    raise _Mismatch(f"{text!r} (this field cannot be set from text)")


def _parse(hint: Any, text: str, token: Optional[Callable[[str], Any]]) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        arms = sorted(args, key=lambda a: (a is not type(None), typing.get_origin(a) in (tuple, list)))
        for arm in arms:
            try:
                return _parse(arm, text, token)
            except _Mismatch:
                continue
        raise _Mismatch(repr(text))
    if origin in (tuple, list):
        body = text.strip()
        if len(body) >= 2 and body[0] + body[-1] in ("[]", "()"):
            body = body[1:-1]
        tokens = [t for t in _SPLIT.split(body) if t]
        fixed = origin is tuple and args and args[-1] is not Ellipsis
        if fixed and len(tokens) != len(args):
            raise _Mismatch(repr(text))
        item = args[0] if args else Any
        out = [_parse(args[i] if fixed else item, t, token) for i, t in enumerate(tokens)]
        return tuple(out) if origin is tuple else out
    return _parse_scalar(hint, text, token)


def parse_value(cls: type, name: str, text: str) -> Any:
    """Command-line ``text`` for field ``name`` of ``cls``, parsed as the field's type and checked.

    Tuples: comma-, slash- or space-separated items, optionally in ``[]`` or ``()``; Optional
    fields take ``none``/``null``/empty text as None; bools take true/false/yes/no/on/off/1/0.
    Raises :class:`FieldError`.
    """
    hint, rule = _hints(cls)[name], _rules(cls).get(name, NO_RULE)
    try:
        value = _parse(hint, text, rule.token)
    except _Mismatch:
        raise FieldError(cls.__name__, name, text, _allowed(hint, rule)) from None
    return check_value(cls, name, value)


def coerce_fields(cls: type, values: Mapping[str, Any], option: Optional[str] = None) -> dict[str, Any]:
    """``values`` (field -> value from JSON/YAML) checked per field; a string given for a
    non-string field is parsed as text (YAML reads ``1e-3`` as a string). Unknown names raise.

    ``option`` (e.g. ``"--config"``) is named in errors when given.
    """
    check_keys(cls, values)
    out = {}
    for name, value in values.items():
        try:
            if isinstance(value, str) and _hints(cls)[name] not in (str, Any) and str not in _arms(_hints(cls)[name]):
                out[name] = parse_value(cls, name, value)
            else:
                out[name] = check_value(cls, name, value)
        except FieldError as e:
            raise (e.from_option(option, f"{name}={value!r}") if option else e) from None
    return out


def parse_assignments(cls: type, items: Iterable[str], option: str,
                      aliases: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    """``["topk=5", "aspect_ratios=0.5,1,2"]`` given to ``option`` -> ``{"topk": 5, "aspect_ratios": (...)}``.

    Each value is parsed as its field's type and checked (:func:`parse_value`); ``aliases`` maps
    short names (``k``) to fields. Errors name the option, the item, the field and what it allows.
    """
    out: dict[str, Any] = {}
    known = field_names(cls)
    for item in items or ():
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise FieldError(cls.__name__, "", item, f"KEY=VALUE with KEY a field of {cls.__name__}", "",
                             option, repr(item))
        name = (aliases or {}).get(key, key)
        if name not in known:
            raise UnknownFieldError(cls.__name__, key, text, f"known fields: {', '.join(known)}", "",
                                    option, f"{key}={text}")
        try:
            out[name] = parse_value(cls, name, text)
        except FieldError as e:
            raise e.from_option(option, f"{key}={text}") from None
    return out
