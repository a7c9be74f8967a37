"""One group per task: the exact spans found, and what must not be found."""

from __future__ import annotations

import pytest

from apmae.tasks import SPAN_TASKS, mine_spans, sample_spans


def found(src: str, task: str, **kw) -> list[str]:
    b = src.encode()
    return [b[s.start:s.end].decode() for s in mine_spans(b, **kw).spans[task]]


CODE = '''class A<T extends Comparable<T>> {
    // x = y + 1 && z; "not a string"
    /* true false 3 ) */
    int x = 3 + 4;
    String s = "a + b == c";
    boolean b = x > 2 && !false || y == 1;
    void f(List<Map<String, Integer>> m) {
        x += 2;
        y = x >> 1;
        i++;
        char c = '+';
        long l = 0x1FL;
        double d = 3.5e2;
    }
}
'''


def test_identifiers_exclude_types_comments_strings():
    ids = found(CODE, "identifier")
    assert ids == ["A", "x", "s", "b", "x", "y", "f", "m", "x", "y", "x", "i", "c", "l", "d"]
    assert "T" not in ids and "List" not in ids and "z" not in ids  # types, comments


def test_identifiers_skip_package_and_imports():
    assert found("package a.b;\nimport c.d.E;\nclass Q { int k; }", "identifier") == ["Q", "k"]


def test_boolean_literals():
    assert found(CODE, "boolean_literal") == ["false"]  # not the ones in the comment


def test_string_literals_are_the_value_without_quotes_not_chars_or_comments():
    assert found(CODE, "string_literal") == ["a + b == c"]
    assert found('class A { String t = """\n  block\n  """; }', "string_literal") == ["  block\n  "]
    assert found('class A { String e = ""; String f = "x\\ny"; }', "string_literal") == ["x\\ny"]  # empty: none


def test_numeric_literals_all_bases():
    assert found(CODE, "numeric_literal") == ["3", "4", "2", "1", "2", "1", "0x1FL", "3.5e2"]


def test_boolean_operators_not_generics_strings_or_comments():
    assert found(CODE, "boolean_operator") == [">", "&&", "!", "||", "=="]


def test_arithmetic_operators():
    assert found(CODE, "arithmetic_operator") == ["+", ">>", "++"]
    assert found("class A { int f() { return -a * (b % c) / d - ~e; } }", "arithmetic_operator") == [
        "-", "*", "%", "/", "-", "~"]


def test_assignment_operators_plain_equals_policy():
    assert found(CODE, "assignment_operator") == ["+="]
    assert found(CODE, "assignment_operator", include_plain_assign=True) == ["+=", "="]
    # declarations' "=" is an initialiser, not an assignment expression
    assert "=" not in found("class A { int q = 1; }", "assignment_operator", include_plain_assign=True)


def test_closing_brackets_not_generic_angles():
    src = "class A { void f(int[] a) { g(a[0]); } }"
    assert found(src, "closing_bracket") == ["]", ")", "]", ")", "}", "}"]  # int[] too
    assert ">" not in found(CODE, "closing_bracket")


def test_end_of_line_spans_carry_next_indentation_and_skip_comment_lines():
    src = "class A {\n    int x = 1; // trailing\n    int y = 2;\n}\n"
    eol = found(src, "end_of_line")
    assert eol == ["\n    ", "\n", "\n"]  # after "{", after "2;", after "}"


def test_malformed_java_yields_fewer_candidates_and_counts_errors():
    res = mine_spans(b"class A { int x = ; void f( { return 1 +; }")
    assert res.parse_errors > 0
    assert isinstance(res.counts(), dict)
    assert mine_spans(b"\x00\xff\xfe garbage ((((").parse_errors > 0


def test_deeply_nested_input_is_bounded():
    src = ("class A { int x = " + "(" * 5000 + "1" + ")" * 5000 + "; }").encode()
    res = mine_spans(src, max_depth=500)
    assert res.nodes < 5000  # did not descend the whole tree


@pytest.mark.parametrize("seed", [1, "file-abc"])
def test_sampling_is_deterministic_under_a_seed(seed):
    res = mine_spans(CODE.encode())
    a, b = sample_spans(res, 2, seed), sample_spans(res, 2, seed)
    assert a == b
    assert sample_spans(res, 2, "other") != a or all(len(res.spans[t]) <= 2 for t in SPAN_TASKS)
    assert all(sum(s.task == t for s in a) <= 2 for t in SPAN_TASKS)
