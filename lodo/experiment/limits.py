"""What a setting may be, written as a short text, and checked by pydantic before any work starts.

The run settings (``lodo.experiment.config.RUN_LIMITS``) and the ``limits:`` block of every
optimizer's and task's YAML use the same texts:

  ``> 0``, ``>= 1``, ``< 1``, ``<= 10``             a bound
  ``[0, 1)``, ``(0, 1e7]``, ``[1, inf)`` …            an interval
  ``one of tfds, files, synthetic``                  a choice

optionally preceded by the type (``integer``, ``number``, ``text``, ``true/false``; otherwise the
type of the YAML's own value) and followed by ``or null`` (null is also accepted) or ``increasing``
(a list whose entries rise strictly). A setting with no limit is still held to its YAML value's
type: an integer stays an integer, a number is finite, a list keeps its length.

pydantic does the checking (strict types: ``true`` is not an integer, ``"abc"`` is not a number);
the message is ours, one line naming the key and what it must be.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import pydantic
from pydantic import BeforeValidator, Field, StrictBool, StrictInt, StrictStr, TypeAdapter

# Integers go to TensorFlow as int64: anything larger is refused before it overflows there.
INT_MAX = 2**62
TYPES = ("integer", "number", "text", "true/false")
_BOUND = re.compile(r"^(>=|<=|>|<)\s*(\S+)$")
_INTERVAL = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^,\s\])]+)\s*([\])])$")


class LimitSyntaxError(ValueError):
    """A ``limits:`` text that is not one of the forms above (a mistake in a YAML, not in a command line)."""


def _finite_number(value):
    """Numbers only (no booleans, no strings that look like numbers), as a float; pydantic checks finiteness."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("not a number")
    try:
        return float(value)
    except OverflowError:  # an integer with hundreds of digits
        raise ValueError("too large") from None


Number = Annotated[float, BeforeValidator(_finite_number)]


@dataclass(frozen=True)
class Limit:
    """One setting's limit, parsed: its type, its bounds or choices, and what that means in words."""

    kind: str  # one of TYPES, or "list", or "any"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    nullable: bool = False
    increasing: bool = False
    item: "Limit | None" = None  # a list's entries
    length: int | None = None  # a list's length
    low_name: str | None = None  # the setting a bound was read from (">= eig_min"), for the message
    high_name: str | None = None

    # -- what it accepts ------------------------------------------------------------------------

    def _scalar_type(self):
        bounds = {}
        if self.low is not None:
            bounds["gt" if self.low_open else "ge"] = self.low
        if self.high is not None:
            bounds["lt" if self.high_open else "le"] = self.high
        if self.kind == "integer":
            bounds.setdefault("ge", -INT_MAX)
            bounds.setdefault("le", INT_MAX)
            return Annotated[StrictInt, Field(**bounds)]
        if self.kind == "number":
            return Annotated[Number, Field(allow_inf_nan=False, **bounds)]
        if self.kind == "text":
            return StrictStr
        if self.kind == "true/false":
            return StrictBool
        return Any

    def python_type(self):
        if self.kind == "list":
            inner = self.item.python_type()
            kind = Annotated[list[inner], Field(min_length=self.length or 0, max_length=self.length)]
        else:
            kind = self._scalar_type()
        return Optional[kind] if self.nullable else kind

    def check(self, value):
        """``value`` as the setting holds it (an integer given for a number becomes a float), or ValueError."""
        try:
            checked = _adapter(self).validate_python(value)
        except (pydantic.ValidationError, RecursionError):
            values = value if isinstance(value, (list, tuple)) else [value]
            if self.high is None and any(isinstance(v, int) and not isinstance(v, bool) and abs(v) > INT_MAX
                                         for v in values):
                raise ValueError(f"{self.describe()}, at most 2**62") from None
            raise ValueError(self.describe()) from None
        if checked is not None and self.choices and checked not in self.choices:
            raise ValueError(self.describe())
        if checked is not None and self.increasing and any(a >= b for a, b in zip(checked, checked[1:])):
            raise ValueError(self.describe())
        return checked

    def nearest(self, value: float) -> float:
        """The number within the bounds nearest to ``value`` (an open bound: the next float inside it).

        The genetic tuner's decay coordinate reaches 0 exactly, which e.g. Lion's β1 ∈ (0, 1] refuses;
        the next float above 0 gives the same update to the last bit.
        """
        value = float(value)
        if self.low is not None and (value < self.low or (self.low_open and value <= self.low)):
            value = math.nextafter(self.low, math.inf) if self.low_open else float(self.low)
        if self.high is not None and (value > self.high or (self.high_open and value >= self.high)):
            value = math.nextafter(self.high, -math.inf) if self.high_open else float(self.high)
        return value

    # -- what it says ---------------------------------------------------------------------------

    def _range(self, noun: str) -> str:
        """``noun`` with the bounds, in words where there are some ("a positive integer <= 100")."""
        low = None if self.low is None else _number(self.low) + (f" ({self.low_name})" if self.low_name else "")
        high = None if self.high is None else _number(self.high) + (f" ({self.high_name})" if self.high_name else "")
        upper = "" if high is None else f" {'<' if self.high_open else '<='} {high}"
        plain = not self.low_name and self.kind in ("integer", "number")
        if plain and self.low == 0 and self.low_open:
            return f"a positive {noun.split()[-1]}{upper}"
        if self.kind == "number" and low is not None and high is not None:
            noun = "a number"
        elif plain and self.low == 0:
            return f"a non-negative {noun.split()[-1]}{upper}"
        elif plain and self.low == 1 and not self.low_open and self.kind == "integer":
            return f"a positive integer{upper}"
        return self._bounds(noun, low, high)

    def _bounds(self, noun: str, low: str | None, high: str | None) -> str:
        """``noun`` and the bounds as symbols ("integers >= 0", "a number in [0, 1)")."""
        if low is None:
            return noun + ("" if high is None else f" {'<' if self.high_open else '<='} {high}")
        if high is None:
            return f"{noun} {'>' if self.low_open else '>='} {low}"
        return f"{noun} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"

    def describe(self, plural: bool = False) -> str:
        """The limit in words, e.g. "an integer >= 1" or "a list of 2 integers >= 0, increasing"."""
        if self.choices:
            text = "one of " + ", ".join(map(str, self.choices))
        elif self.kind == "list":
            text = (f"a list of {self.length or 'one or more'} {self.item.describe(plural=True)}"
                    + (", increasing" if self.increasing else ""))
        elif plural:  # a list's entries: the bounds as symbols after the plural noun
            text = self._bounds(NOUNS[self.kind][1], None if self.low is None else _number(self.low),
                                None if self.high is None else _number(self.high))
        else:
            text = self._range(NOUNS[self.kind][0])
        return text + (" or null" if self.nullable else "")


NOUNS = {"integer": ("an integer", "integers"), "number": ("a finite number", "finite numbers"),
         "text": ("a text", "texts"), "true/false": ("true or false", "true/false values"), "any": ("any value", "values")}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e16 else f"{value:g}"


_ADAPTERS: dict = {}


def _adapter(limit: Limit) -> TypeAdapter:
    if limit not in _ADAPTERS:
        _ADAPTERS[limit] = TypeAdapter(limit.python_type())
    return _ADAPTERS[limit]


def kind_of(value) -> str:
    """The type a YAML value stands for ("any" for null and interpolations such as ``${steps}``)."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "any" if "${" in value else "text"
    return "any"


def parse(text: str | None, default=None, names: dict | None = None) -> Limit:
    """The ``Limit`` a text states for a setting whose YAML value is ``default``.

    A bound may name another setting (``">= eig_min"``): ``names`` gives its value.
    """
    if isinstance(default, (list, tuple)):
        first = default[0] if default else None
        return _parse_list(text, first, len(default), names)
    if text is None:
        return Limit(kind_of(default))
    if not isinstance(text, str):
        raise LimitSyntaxError(f"a limit is a text such as \"[0, 1)\", got {text!r}")
    rest = " ".join(text.split())
    nullable = rest.endswith(" or null") or rest == "null"
    rest = rest[: -len(" or null")] if rest.endswith(" or null") else rest
    kind = kind_of(default)
    for name in TYPES:
        if rest == name or rest.startswith(name + " "):
            kind, rest = name, rest[len(name):].strip()
    rest = rest[len("in "):] if rest.startswith("in ") else rest
    if rest.startswith("one of "):
        choices = tuple(c.strip() for c in rest[len("one of "):].split(","))
        if kind == "any":
            kind = "text"
        return Limit(kind, choices=choices, nullable=nullable)
    low = high = None
    low_open = high_open = False
    low_name = high_name = None
    if rest:
        bound, interval = _BOUND.match(rest), _INTERVAL.match(rest)
        if bound:
            op, token = bound.group(1), bound.group(2)
            value, name = _float(token, text, names), token if names and token in names else None
            if op.startswith(">"):
                low, low_open, low_name = value, op == ">", name
            else:
                high, high_open, high_name = value, op == "<", name
        elif interval:
            low, high = _float(interval.group(2), text, names), _float(interval.group(3), text, names)
            low_open, high_open = interval.group(1) == "(", interval.group(4) == ")"
            low = None if low == -math.inf else low
            high = None if high == math.inf else high
        else:
            raise LimitSyntaxError(f"cannot read the limit {text!r} (e.g. \"> 0\", \"[0, 1)\", \"one of a, b\")")
        if kind not in ("integer", "number"):
            kind = "number"
    return Limit(kind, low, high, low_open, high_open, nullable=nullable, low_name=low_name, high_name=high_name)


def _parse_list(text, first, length: int, names) -> Limit:
    rest = " ".join((text or "").split())
    increasing = rest.endswith("increasing")
    rest = rest[: -len("increasing")].rstrip(" ,") if increasing else rest
    return Limit("list", item=parse(rest or None, first, names), length=length or None, increasing=increasing)


def _float(text: str, limit: str, names: dict | None) -> float:
    if names and text in names:
        value = names[text]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"the limit {limit!r} needs {text} to be a number")
        return float(value)
    try:
        return float(text)
    except ValueError:
        raise LimitSyntaxError(f"cannot read the number {text!r} in the limit {limit!r}") from None
