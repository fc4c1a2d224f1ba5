"""A topic's `retry_when` expression (the original's re_notify_flag), parsed and evaluated safely.

A 2xx callback reply still counts as a failure when the expression is true, for example
`{res.code}!=200 && {res.data.status}!=2 || {res.data.msg}=='failed'`. A small tokenizer and a
precedence-climbing parser build an immutable tree; nothing is handed to Python's own
evaluator, and evaluating a tree never raises, whatever the reply holds.
"""

from __future__ import annotations

import json
import operator
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

MAX_LENGTH: Final = 1024
MAX_DEPTH: Final = 32
PLACEHOLDER: Final = "重试标记"  # the original's column default, meaning "no expression"

_EXPECT_VALUE: Final = "expected a value ({path}, number, string, true/false/null or '(')"
_NUMBER: Final = r"-?(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
# What PHP 8 treats as a numeric string: optional surrounding whitespace, ASCII digits only.
_NUMERIC_STRING: Final = (
    r"[ \t\n\r\v\f]*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[ \t\n\r\v\f]*"
)
_WORDS: Final[dict[str, Any]] = {"true": True, "false": False, "null": None, "none": None}
_WORD_OPERATORS: Final = {"and": "&&", "or": "||", "not": "!"}
_OPERATORS: Final = ("&&", "||", "==", "!=", "<=", ">=", "<", ">", "!")  # longest match first
_PRECEDENCE: Final = {"||": 1, "&&": 2, "==": 3, "!=": 3, "<": 3, "<=": 3, ">": 3, ">=": 3}
_ORDERINGS: Final[dict[str, Callable[[Any, Any], Any]]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}
_ESCAPES: Final = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"'}


class RetryExprError(ValueError):
    """A retry_when expression that cannot be parsed; `position` is the 0-based char offset."""

    def __init__(self, what: str, position: int, source: str = "", hint: str = "") -> None:
        self.what, self.hint, self.position, self.source = what, hint, position, source
        self.message = f"{what}: {hint}" if hint else what
        super().__init__(self.message)

    def __str__(self) -> str:
        text = f"{self.what} at position {self.position}" + (f": {self.hint}" if self.hint else "")
        if not self.source:
            return text
        shown = "".join(" " if ch.isspace() else ch for ch in self.source)
        wide = sum(unicodedata.east_asian_width(ch) in "WF" for ch in shown[: self.position])
        return f"{text}\n    {shown}\n    {' ' * (self.position + wide)}^"  # caret under it


def _truthy(value: Any) -> bool:
    """PHP truthiness: null, false, 0, 0.0, '', '0' and empty arrays are false."""
    return value not in ("", "0") if isinstance(value, str) else bool(value)


def _number(value: Any, *, strings: bool) -> int | float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if strings and isinstance(value, str) and re.fullmatch(_NUMERIC_STRING, value):
        try:
            return int(value)
        except ValueError:  # a fraction, an exponent, or more digits than int() accepts
            return float(value)
    return None


def _numbers(a: Any, b: Any) -> tuple[int | float, int | float] | None:
    """Both sides as numbers when one is a number and the other a number or numeric string."""
    if _number(a, strings=False) is None and _number(b, strings=False) is None:
        return None  # two strings compare as strings, even numeric ones (PHP differs here)
    x, y = _number(a, strings=True), _number(b, strings=True)
    return None if x is None or y is None else (x, y)


def _equal(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, bool) or isinstance(b, bool):
        return _truthy(a) == _truthy(b)  # PHP compares anything with a bool as a bool
    pair = _numbers(a, b)
    if pair is not None:
        return pair[0] == pair[1]
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    if isinstance(a, list | dict) and type(a) is type(b):
        try:
            return bool(a == b)
        except RecursionError:  # absurdly deep replies are simply not equal
            return False
    return False


def _compare(op: str, a: Any, b: Any) -> bool:
    if op in ("==", "!="):
        return _equal(a, b) == (op == "==")
    pair = _numbers(a, b)
    if pair is not None:
        return bool(_ORDERINGS[op](*pair))
    if isinstance(a, str) and isinstance(b, str):
        return bool(_ORDERINGS[op](a, b))
    return False  # ordering null, bools, arrays or mixed types is simply false


@dataclass(frozen=True, slots=True)
class Const:
    value: Any

    def resolve(self, context: Mapping[str, Any]) -> Any:
        return self.value


@dataclass(frozen=True, slots=True)
class Path:
    keys: tuple[str, ...]

    def resolve(self, context: Mapping[str, Any]) -> Any:
        current: Any = context
        for key in self.keys:
            if isinstance(current, Mapping):
                current = current.get(key)
            elif isinstance(current, list | tuple) and key.isascii() and key.isdigit():
                index = int(key)
                current = current[index] if index < len(current) else None
            else:
                return None
        return current


@dataclass(frozen=True, slots=True)
class Not:
    operand: Node

    def resolve(self, context: Mapping[str, Any]) -> bool:
        return not _truthy(self.operand.resolve(context))


@dataclass(frozen=True, slots=True)
class Compare:
    op: str
    left: Node
    right: Node

    def resolve(self, context: Mapping[str, Any]) -> bool:
        return _compare(self.op, self.left.resolve(context), self.right.resolve(context))


@dataclass(frozen=True, slots=True)
class Logic:
    """`&&` or `||` over a flat tuple of operands, so long chains stay shallow."""

    op: str
    operands: tuple[Node, ...]

    def resolve(self, context: Mapping[str, Any]) -> bool:
        values = (_truthy(o.resolve(context)) for o in self.operands)
        return all(values) if self.op == "&&" else any(values)


Node = Const | Path | Not | Compare | Logic


@dataclass(frozen=True, slots=True)
class Expr:
    """A parsed retry_when expression; `evaluate` never raises, whatever the context holds."""

    source: str
    root: Node

    def evaluate(self, context: Mapping[str, Any]) -> bool:
        return _truthy(self.root.resolve(context))


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "value", "path", "op", "(", ")" or "end"
    pos: int
    end: int
    value: Any = None


def _scan_path(src: str, i: int) -> _Token:
    close = src.find("}", i + 1)
    if close < 0:
        raise RetryExprError("unterminated path", i, src, "close it with '}', like {res.code}")
    inner = src[i + 1 : close]
    if "{" in inner:
        raise RetryExprError("unexpected '{' inside a path", i + 1 + inner.index("{"), src,
                             "is a '}' missing before it?")
    if not inner.strip():
        raise RetryExprError("empty path '{}'", i, src, "write a path like {res.code}")
    keys: list[str] = []
    offset = i + 1
    for part in inner.split("."):
        if not part.strip():
            raise RetryExprError("empty segment in path", offset, src,
                                 "write names or indexes between the dots, like {res.items.0}")
        keys.append(part.strip())
        offset += len(part) + 1
    return _Token("path", i, close + 1, tuple(keys))


def _scan_string(src: str, i: int) -> _Token:
    quote, j = src[i], i + 1
    chars: list[str] = []
    while j < len(src) and src[j] != quote:
        if src[j] == "\\" and j + 1 < len(src):
            j += 1
            chars.append(_ESCAPES.get(src[j], "\\" + src[j]))  # PHP keeps unknown escapes
        else:
            chars.append(src[j])
        j += 1
    if j >= len(src):
        raise RetryExprError("unterminated string", i, src, f"add the closing {quote}")
    return _Token("value", i, j + 1, "".join(chars))


def _scan_other(src: str, i: int) -> _Token:
    c = src[i]
    number = re.match(_NUMBER, src[i:]) if c.isascii() and (c.isdigit() or c in "-.") else None
    if number:
        text = number.group()
        value = float(text) if any(ch in text for ch in ".eE") else int(text)
        return _Token("value", i, i + len(text), value)
    if c.isalpha() or c == "_":
        word = re.match(r"\w+", src[i:])
        text = word.group() if word else c
        low = text.lower()
        if low in _WORD_OPERATORS:
            return _Token("op", i, i + len(text), _WORD_OPERATORS[low])
        if low in _WORDS:
            return _Token("value", i, i + len(text), _WORDS[low])
        raise RetryExprError(f"unknown word {text!r}", i, src,
                             f"put text in quotes ('{text}') or a path in braces ({{res.{text}}})")
    if src.startswith(("===", "!=="), i):
        raise RetryExprError(f"{src[i : i + 3]!r} is not supported", i, src,
                             f"use {src[i : i + 2]!r}")
    for op in _OPERATORS:
        if src.startswith(op, i):
            return _Token("op", i, i + len(op), op)
    if c == "-":
        raise RetryExprError("unexpected '-'", i, src, "a minus sign must be followed by digits")
    hint = f"did you mean {c * 2!r}?" if c in "&|=" else ""
    raise RetryExprError(f"unexpected character {c!r}", i, src, hint)


def _tokenize(src: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    while i < len(src):
        c = src[i]
        if c.isspace():
            i += 1
            continue
        if c in "()":
            token = _Token(c, i, i + 1)
        elif c == "{":
            token = _scan_path(src, i)
        elif c in "'\"":
            token = _scan_string(src, i)
        else:
            token = _scan_other(src, i)
        tokens.append(token)
        i = token.end
    tokens.append(_Token("end", len(src), len(src)))
    return tokens


class _Parser:
    def __init__(self, src: str) -> None:
        self.src = src
        self.tokens = _tokenize(src)
        self.index = 0
        self.depth = 0

    def take(self) -> _Token:
        self.index += 1
        return self.tokens[self.index - 1]

    def unexpected(self, token: _Token, hint: str) -> RetryExprError:
        shown = "end of input" if token.kind == "end" else repr(self.src[token.pos : token.end])
        return RetryExprError(f"unexpected {shown}", token.pos, self.src, hint)

    def enter(self, token: _Token) -> None:
        if self.depth >= MAX_DEPTH:
            raise RetryExprError(f"nesting deeper than {MAX_DEPTH} levels", token.pos, self.src,
                                 "simplify the expression")
        self.depth += 1

    def expression(self, min_precedence: int) -> Node:
        left = self.unary()
        chained = False
        while True:
            token = self.tokens[self.index]
            precedence = _PRECEDENCE.get(token.value, 0) if token.kind == "op" else 0
            if precedence < min_precedence:
                return left
            if chained and precedence == _PRECEDENCE["=="]:
                raise self.unexpected(token, "comparisons cannot be chained; join them with '&&'")
            self.take()
            right = self.expression(precedence + 1)
            if precedence == _PRECEDENCE["=="]:
                left, chained = Compare(token.value, left, right), True
            elif isinstance(left, Logic) and left.op == token.value:
                left = Logic(token.value, (*left.operands, right))
            else:
                left = Logic(token.value, (left, right))

    def unary(self) -> Node:
        token = self.tokens[self.index]
        if token.kind == "op" and token.value == "!":
            self.enter(self.take())
            operand = self.unary()
            self.depth -= 1
            return Not(operand)
        return self.primary()

    def primary(self) -> Node:
        token = self.take()
        if token.kind == "value":
            return Const(token.value)
        if token.kind == "path":
            return Path(token.value)
        if token.kind == "(":
            self.enter(token)
            inner = self.expression(1)
            close = self.take()
            if close.kind != ")":
                raise self.unexpected(close, f"expected ')' to close the '(' at {token.pos}")
            self.depth -= 1
            return inner
        raise self.unexpected(token, _EXPECT_VALUE)


def parse(text: str) -> Expr:
    """Parse a retry_when expression, or raise RetryExprError saying where and why."""
    if len(text) > MAX_LENGTH:
        raise RetryExprError(f"expression is {len(text)} characters long", MAX_LENGTH, "",
                             f"the limit is {MAX_LENGTH}")
    parser = _Parser(text)
    root = parser.expression(1)
    token = parser.tokens[parser.index]
    if token.kind != "end":
        hint = ("it has no matching '('" if token.kind == ")"
                else "expected an operator ('&&', '||', '==', ...) or the end")
        raise parser.unexpected(token, hint)
    return Expr(text, root)


def compile_retry_when(text: str) -> Expr | None:
    """A topic's retry_when as stored; None when empty or the original's placeholder."""
    if not text.strip() or text.strip() == PLACEHOLDER:
        return None
    return parse(text)


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # PHP's json_decode refuses NaN and Infinity


def should_retry(expr: Expr | None, status: int, body_text: str) -> bool:
    """True when a reply must be retried although its HTTP status said success.

    As the original's DqModule::notify: the expression is evaluated only when the reply
    decodes to a JSON object or array; any other reply (plain text, HTML, a JSON string
    or number, JSON nested too deep to decode) is not judged by it."""
    if expr is None:
        return False
    try:
        res: Any = json.loads(body_text, parse_constant=_not_json)
    except (ValueError, RecursionError):  # not JSON (or absurdly nested)
        return False
    if not isinstance(res, dict | list):
        return False
    return expr.evaluate({"res": res, "status": status, "body": body_text})
