"""retry_when: what expressions mean, where malformed ones fail, and that nothing else raises."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dq.registry import retry_expr
from dq.registry.retry_expr import (
    MAX_DEPTH,
    MAX_LENGTH,
    Expr,
    RetryExprError,
    compile_retry_when,
    parse,
    should_retry,
)

ORIGINAL = "{res.code}!=200 && {res.data.status}!=2 || {res.data.msg}=='failed'"


def ctx(res: Any, status: int = 200, body: str | None = None) -> dict[str, Any]:
    return {"res": res, "status": status, "body": json.dumps(res) if body is None else body}


TRUTH = [
    # the original's example
    (ORIGINAL, ctx({"code": 200, "data": {"status": 1, "msg": "ok"}}), False),
    (ORIGINAL, ctx({"code": 500, "data": {"status": 1, "msg": "ok"}}), True),
    (ORIGINAL, ctx({"code": 500, "data": {"status": 2, "msg": "ok"}}), False),
    (ORIGINAL, ctx({"code": 200, "data": {"status": 2, "msg": "failed"}}), True),
    (ORIGINAL, ctx("plain text reply"), True),  # every path is null: null != 200
    # precedence: ! > comparisons > && > ||
    ("true || false && false", ctx({}), True),
    ("(true || false) && false", ctx({}), False),
    ("false && true || true", ctx({}), True),
    ("!false && false", ctx({}), False),
    ("!(false && false)", ctx({}), True),
    ("!{res.ok}", ctx({"ok": 0}), True),
    ("!{res.ok}==true", ctx({"ok": 0}), True),  # (!0) == true
    ("not {res.ok} or {res.n} > 3", ctx({"ok": 1, "n": 4}), True),
    ("{res.a}==1 and {res.b}==2", ctx({"a": 1, "b": 2}), True),
    ("{res.a}==1 AND {res.b}==3", ctx({"a": 1, "b": 2}), False),
    ("!!{res.a}", ctx({"a": "x"}), True),
    ("(((({status}==200))))", ctx({}, status=200), True),
    # numbers, numeric strings and strings
    ("{res.code}==200", ctx({"code": "200"}), True),
    ("{res.code}=='200'", ctx({"code": 200}), True),
    ("{res.code}==200.0", ctx({"code": 200}), True),
    ("{res.code}>=200", ctx({"code": " 200 "}), True),
    ("{res.code}<1e3", ctx({"code": "999.5"}), True),
    ("{res.code}==200", ctx({"code": "200abc"}), False),
    ("{res.code}!=200", ctx({"code": "200abc"}), True),
    ("{res.code}<300", ctx({"code": "abc"}), False),
    ("{res.code}>=300", ctx({"code": "abc"}), False),
    ("{res.t}>-1.5", ctx({"t": -1}), True),
    ("{res.t}<-1.5", ctx({"t": -2}), True),
    ("{res.v}=='10'", ctx({"v": "10"}), True),
    ("{res.v}<'9'", ctx({"v": "10"}), True),  # two strings compare as strings
    ("{res.v}=='1e1'", ctx({"v": "10"}), False),
    ('{res.msg}=="it\'s \\"done\\""', ctx({"msg": 'it\'s "done"'}), True),
    ("{res.msg}=='a\\nb'", ctx({"msg": "a\nb"}), True),
    ("{res.msg}=='失败'", ctx({"msg": "失败"}), True),
    ("{res.结果.状态}=='成功'", ctx({"结果": {"状态": "成功"}}), True),
    ("{res.msg}=='失败'", ctx({"msg": "成功"}), False),
    ("{res.msg}=='failed'", ctx({"msg": "FAILED"}), False),
    # null, missing paths and mismatched types
    ("{res.none}==null", ctx({}), True),
    ("{res.a.b.c}==NULL", ctx({"a": 1}), True),
    ("{res.a}==None", ctx({"a": None}), True),
    ("{res.a}!=null", ctx({"a": 0}), True),
    ("{res.a}==0", ctx({}), False),
    ("{res.a}<1", ctx({}), False),
    ("{res.a}>=null", ctx({}), False),
    ("{res.a}==1", ctx({"a": {"x": 1}}), False),
    ("{res.a}!=1", ctx({"a": [1]}), True),
    ("{res.a}<1", ctx({"a": [0]}), False),
    ("{res.a}=={res.b}", ctx({"a": {"x": [1]}, "b": {"x": [1]}}), True),
    ("{res.a}=={res.b}", ctx({"a": [1], "b": {"0": 1}}), False),
    ("{res.code}==200", ctx([200]), False),
    ("{res}=='busy'", ctx("busy"), True),
    ("{body}=='busy'", ctx("busy", body="busy"), True),
    ("{status}==202", ctx({}, status=202), True),
    ("{nothing.here}==null", ctx({}), True),
    # booleans compare as PHP does: the other side by its truthiness
    ("{res.ok}==true", ctx({"ok": True}), True),
    ("{res.ok}==TRUE", ctx({"ok": 1}), True),
    ("{res.ok}==False", ctx({"ok": "0"}), True),
    ("{res.ok}==false", ctx({"ok": []}), True),
    ("{res.ok}<true", ctx({"ok": False}), False),
    # list indices
    ("{res.items.0.id}==7", ctx({"items": [{"id": 7}]}), True),
    ("{res.items.1.id}==null", ctx({"items": [{"id": 7}]}), True),
    ("{res.items.-1}==null", ctx({"items": [1]}), True),
    ("{res.items.x}==null", ctx({"items": [1]}), True),
    ("{res.0}=='a'", ctx(["a"]), True),
    # bare values use PHP truthiness
    ("{res.retry}", ctx({"retry": 1}), True),
    ("{res.retry}", ctx({"retry": "0"}), False),
    ("{res.retry}", ctx({"retry": ""}), False),
    ("{res.retry}", ctx({"retry": "false"}), True),
    ("{res.retry}", ctx({"retry": 0.0}), False),
    ("{res.retry}", ctx({"retry": []}), False),
    ("{res.retry}", ctx({"retry": {}}), False),
    ("{res.retry}", ctx({"retry": [0]}), True),
    ("{res.retry}", ctx({}), False),
    ("'0'", ctx({}), False),
    ("0.5", ctx({}), True),
    ("  { res . retry }  ", ctx({"retry": True}), True),
]


@pytest.mark.parametrize(("text", "context", "expected"), TRUTH)
def test_evaluate(text: str, context: dict[str, Any], expected: bool) -> None:
    expr = parse(text)
    assert expr.source == text
    assert expr.evaluate(context) is expected


MALFORMED = [
    ("", 0, "unexpected end of input"),
    ("   ", 3, "unexpected end of input"),
    ("{res.code} # 1", 11, "unexpected character '#'"),
    ("{res.code} & 1", 11, "did you mean '&&'"),
    ("{res.code} = 1", 11, "did you mean '=='"),
    ("{res.code}===1", 10, "'===' is not supported"),
    ("{res.code}!==1", 10, "'!==' is not supported"),
    ("{res.msg}=='failed", 11, "unterminated string"),
    ('{res.msg}=="x\\"', 11, "unterminated string"),
    ("({res.code}==200", 16, "expected ')'"),
    ("{res.code}==200 && (", 20, "unexpected end of input"),
    ("({res.code}==200 1)", 17, "expected ')'"),
    ("{res.code}==200)", 15, "no matching '('"),
    ("()", 1, "unexpected ')'"),
    ("{}==1", 0, "empty path"),
    ("{ }==1", 0, "empty path"),
    ("{res..code}==1", 5, "empty segment"),
    ("{res.code.}==1", 10, "empty segment"),
    ("{res.code==1", 0, "unterminated path"),
    ("{res.a==1 && {b}", 13, "unexpected '{' inside a path"),
    ("{res.code}== && 1", 13, "unexpected '&&': expected a value"),
    ("&& {res.code}", 0, "unexpected '&&'"),
    ("{res.code}==", 12, "unexpected end of input"),
    ("{res.code} ||", 13, "unexpected end of input"),
    ("!", 1, "unexpected end of input"),
    ("{res.code}==200 300", 16, "unexpected '300'"),
    ("{res.code}==200 {res.x}", 16, "unexpected '{res.x}'"),
    ("{res.a}==1==1", 10, "cannot be chained"),
    ("{res.a}<1<2", 9, "cannot be chained"),
    ("{res.msg}==failed", 11, "unknown word 'failed'"),
    ("{res.msg}==失败", 11, "unknown word '失败'"),
    ("{res.a}==- 1", 9, "minus sign"),
    ("{res.a}==.", 9, "unexpected character '.'"),
    ("(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1), MAX_DEPTH, "nesting deeper"),
    ("!" * (MAX_DEPTH + 1) + "1", MAX_DEPTH, "nesting deeper"),
    ("1" + " " * MAX_LENGTH, MAX_LENGTH, "characters long"),
]


@pytest.mark.parametrize(("text", "position", "words"), MALFORMED)
def test_malformed(text: str, position: int, words: str) -> None:
    with pytest.raises(RetryExprError) as caught:
        parse(text)
    assert caught.value.position == position
    assert words in caught.value.message
    assert words.split(":")[0] in str(caught.value)


def test_limits_are_inclusive() -> None:
    parse("(" * MAX_DEPTH + "1" + ")" * MAX_DEPTH)
    parse("!" * MAX_DEPTH + "1")
    parse("1" + " " * (MAX_LENGTH - 1))
    long_chain = "1" + "&&1" * ((MAX_LENGTH - 1) // 3)
    assert parse(long_chain).evaluate({}) is True
    mixed = "!0" + "&&!0||0" * ((MAX_LENGTH - 2) // 7)
    assert parse(mixed).evaluate({}) is True


def test_error_str_points_at_the_position() -> None:
    with pytest.raises(RetryExprError) as caught:
        parse("{res.code}== && 1")
    first, source, caret = str(caught.value).splitlines()
    assert first == (
        "unexpected '&&' at position 13: expected a value "
        "({path}, number, string, true/false/null or '(')"
    )
    assert caret.index("^") - source.index("{") == 13
    assert isinstance(caught.value, ValueError)


def test_compile_retry_when() -> None:
    assert compile_retry_when("") is None
    assert compile_retry_when("  \n") is None
    assert compile_retry_when("重试标记") is None
    expr = compile_retry_when("{res.code}!=0")
    assert isinstance(expr, Expr)
    with pytest.raises(RetryExprError):
        compile_retry_when("{res.code}!=")


def test_should_retry() -> None:
    expr = parse(ORIGINAL)
    assert should_retry(None, 200, '{"code": 500}') is False
    assert should_retry(expr, 200, '{"code": 200, "data": {"status": 2}}') is False
    assert should_retry(expr, 200, '{"code": 500, "data": {"status": 1}}') is True
    # The original evaluates re_notify_flag only on a reply that json_decode()s to an array
    # (a JSON object or list): anything else is not judged by the expression.
    assert should_retry(expr, 200, "<html>oops</html>") is False
    assert should_retry(parse("{res}=='OK'"), 200, "OK") is False
    assert should_retry(parse("{body}=='\"OK\"'"), 200, '"OK"') is False
    assert should_retry(parse("{res}=='OK'"), 200, '"OK"') is False
    assert should_retry(parse("{status}!=200"), 204, "") is False
    assert should_retry(parse("true"), 200, "[NaN]") is False  # PHP's json_decode refuses it
    assert should_retry(parse("{res.code}==1"), 200, "[" * 100_000) is False
    assert should_retry(parse("{res}>0"), 200, "9" * 10_000) is False
    assert should_retry(parse("{status}==202"), 202, "{}") is True
    assert should_retry(parse("{body}=='[]'"), 200, "[]") is True
    assert should_retry(parse("{res.0}==1"), 200, " [1] ") is True


def test_source_has_no_dynamic_evaluation() -> None:
    source = Path(retry_expr.__file__).read_text(encoding="utf-8")
    for banned in ("eval(", "exec(", "compile(", "import ast", "from ast", "__import__"):
        assert banned not in source
    assert not re.search(r"^\s*(import|from)\s+(ast|builtins)\b", source, re.M)


FRAGMENTS = [
    "{res}", "{res.a}", "{res.0}", "{res.a.0.b}", "{status}", "{body}", "{res.a.a}",
    "==", "!=", "<", "<=", ">", ">=", "&&", "||", "!", "and", "not", "(", ")",
    "0", "1", "-2.5", "1e400", "'x'", "'0'", '"200"', "''", "null", "true", "False", " ",
]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.sampled_from(["200", " 1 ", "1e999", "-0", "nan", "a"]),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["a", "b", "0", "x"]), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=60))
def test_parse_raises_only_retry_expr_error(text: str) -> None:
    try:
        parse(text)
    except RetryExprError as e:
        assert 0 <= e.position <= len(text)
        str(e)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=12).map("".join), JSON, st.integers())
def test_evaluate_never_raises(text: str, reply: Any, status: int) -> None:
    try:
        expr = parse(text)
    except RetryExprError as e:
        assert 0 <= e.position <= len(text)
        return
    assert expr.evaluate({"res": reply, "status": status, "body": str(reply)}) in (True, False)
    body = json.dumps(reply)
    assert should_retry(expr, status, body) in (True, False)
    assert should_retry(expr, status, body[: len(body) // 2]) in (True, False)


@settings(max_examples=200, deadline=None)
@given(JSON, JSON)
def test_comparisons_never_raise(a: Any, b: Any) -> None:
    context = {"res": {"a": a, "b": b}}
    for op in ("==", "!=", "<", "<=", ">", ">="):
        parse(f"{{res.a}}{op}{{res.b}}").evaluate(context)
    parse("{res.a} && !{res.b} || {res.a}").evaluate(context)
