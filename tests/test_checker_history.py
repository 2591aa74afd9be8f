"""Reading histories: formats, detection, pairing rules, and errors with line numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvstore.checker.history import HistoryFormatError, detect_format, from_dicts, load, parse_text


def jsonl(*rows: dict[str, object]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_jsonl_pairs_invoke_with_first_completion_of_same_process() -> None:
    text = jsonl(
        {"index": 0, "time": 10, "process": 0, "type": "invoke", "f": "write", "key": "a", "value": 1, "node": "n1"},
        {"index": 1, "time": 20, "process": 1, "type": "invoke", "f": "read", "key": "a", "value": None},
        {"index": 2, "time": 30, "process": 1, "type": "ok", "f": "read", "key": "a", "value": 1},
        {"index": 3, "time": 40, "process": 0, "type": "ok", "f": "write", "key": "a", "value": 1},
    )
    h = parse_text(text)
    assert h.format == "jsonl"
    write, read = h.ops
    assert (write.f, write.type, write.invoke, write.complete, write.node) == ("write", "ok", 0, 3, "n1")
    assert (read.f, read.result, read.invoke, read.complete) == ("read", 1, 1, 2)
    assert (write.invoke_time, write.complete_time) == (10, 40)
    assert h.length == 4


def test_invoke_without_completion_is_info() -> None:
    h = from_dicts([{"process": 0, "type": "invoke", "f": "write", "key": "a", "value": 1}])
    assert h.ops[0].type == "info" and h.ops[0].complete is None


def test_siblings_are_kept_and_value_is_none() -> None:
    h = from_dicts([
        {"process": 0, "type": "invoke", "f": "read", "key": "a", "value": None},
        {"process": 0, "type": "ok", "f": "read", "key": "a", "value": None, "siblings": [1, [2, 3]]},
    ])
    assert h.ops[0].siblings == (1, (2, 3))  # frozen: hashable for the model
    assert h.ops[0].result is None


def test_nemesis_events_are_kept_aside() -> None:
    h = from_dicts([
        {"process": "nemesis", "type": "info", "f": "start-partition", "value": [["n1"], ["n2", "n3"]]},
        {"process": 0, "type": "invoke", "f": "read", "key": "a", "value": None},
    ])
    assert len(h.ops) == 1 and h.ops[0].invoke == 1
    assert h.nemesis[0].f == "start-partition" and h.nemesis[0].value == [["n1"], ["n2", "n3"]]


@pytest.mark.parametrize(
    ("rows", "line", "fragment"),
    [
        ([{"process": 0, "type": "ok", "f": "read", "key": "a"}], 1, "completes no open invoke"),
        ([{"process": 0, "type": "invoke", "f": "read"}, {"process": 0, "type": "invoke", "f": "read"}], 2,
         "one op at a time"),
        ([{"process": 0, "type": "begin", "f": "read"}], 1, "type must be one of"),
        ([{"process": 0, "f": "read"}], 1, "missing field 'type'"),
        ([{"process": 0, "type": "invoke", "f": "read"}, {"process": 0, "type": "ok", "f": "write"}], 2,
         "does not match its invoke"),
    ],
)
def test_malformed_jsonl_names_the_line(rows: list[dict[str, object]], line: int, fragment: str) -> None:
    with pytest.raises(HistoryFormatError) as err:
        parse_text(jsonl(*rows))
    assert err.value.line == line
    assert fragment in str(err.value)


def test_invalid_json_line_number(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    path.write_text('{"process": 0, "type": "invoke", "f": "read"}\n\n{"process": 0, "type": \n')
    with pytest.raises(HistoryFormatError) as err:
        load(path)
    assert err.value.line == 3
    assert str(err.value).startswith(f"{path}:3: invalid JSON")


def test_edn_vector_with_comments_keywords_and_nil() -> None:
    text = """; a comment
    [{:type :invoke, :f :write, :value 3, :process 0, :time 5}
     {:type :ok, :f :write, :value 3, :process 0, :time 7} ; trailing comment
     {:type :invoke, :f :read, :value nil, :process 1}
     {:type :ok, :f :read, :value 3, :process 1}
     {:type :info, :f :start, :value :isolated, :process :nemesis}]"""
    h = parse_text(text)
    assert h.format == "edn"
    assert [(op.f, op.key, op.value, op.result) for op in h.ops] == [("write", None, 3, None), ("read", None, None, 3)]
    assert h.ops[0].invoke_time == 5
    assert h.nemesis[0].f == "start" and h.nemesis[0].value == "isolated"


def test_edn_bare_sequence_with_keys_and_cas_vectors() -> None:
    text = '{:process 0, :type :invoke, :f :cas, :key "x", :value [1 2]}\n{:process 0, :type :fail, :f :cas, :key "x", :value [1 2]}\n'
    h = parse_text(text)
    assert (h.ops[0].key, h.ops[0].value, h.ops[0].type) == ("x", (1, 2), "fail")


def test_edn_independent_tuples_split_by_key() -> None:
    text = """[{:type :invoke :f :write :value [7 1] :process 0}
              {:type :ok :f :write :value [7 1] :process 0}
              {:type :invoke :f :cas :value [8 [1 2]] :process 1}
              {:type :ok :f :cas :value [8 [1 2]] :process 1}]"""
    h = parse_text(text)
    assert [(op.key, op.value) for op in h.ops] == [(7, 1), (8, (1, 2))]


def test_edn_plain_cas_register_is_not_mistaken_for_independent() -> None:
    text = "[{:type :invoke :f :cas :value [1 2] :process 0} {:type :ok :f :cas :value [1 2] :process 0}]"
    h = parse_text(text)
    assert (h.ops[0].key, h.ops[0].value) == (None, (1, 2))


def test_malformed_edn_names_the_line() -> None:
    text = "{:process 0, :type :invoke, :f :read}\n{:process 0, :type :ok, :f :read, :value [1 2}\n"
    with pytest.raises(HistoryFormatError) as err:
        parse_text(text, "edn")
    assert err.value.line == 2


def test_edn_non_map_form_is_an_error() -> None:
    with pytest.raises(HistoryFormatError, match="expected an op map"):
        parse_text("[{:process 0, :type :invoke, :f :read} 42]", "edn")


def test_jepsen_log_lines_tabs_spaces_and_timeouts() -> None:
    text = (
        "INFO  jepsen.core - Running test\n"
        "INFO  jepsen.util - 0\t:invoke\t:write\t4\n"
        "INFO  jepsen.util - 1   :invoke :cas    [4 0]\n"
        "INFO  jepsen.util - 0\t:ok\t:write\t4\n"
        "INFO  jepsen.util - 2\t:invoke\t:read\tnil\n"
        "INFO  jepsen.util - 1\t:info\t:cas\t:timed-out\n"
        "INFO  jepsen.util - 2\t:fail\t:read\t:timed-out\n"
    )
    assert detect_format(text) == "jepsen-log"
    h = parse_text(text)
    write, cas, read = h.ops
    assert (write.type, write.value, write.line) == ("ok", 4, 2)
    assert (cas.type, cas.value, cas.error) == ("info", (4, 0), "timed-out")
    assert (read.type, read.error) == ("fail", "timed-out")


def test_jepsen_log_bad_value_names_the_line() -> None:
    text = "INFO  jepsen.util - 0\t:invoke\t:write\t4\nINFO  jepsen.util - 0\t:ok\t:write\t[4\n"
    with pytest.raises(HistoryFormatError) as err:
        parse_text(text)
    assert err.value.line == 2


def test_detect_format() -> None:
    assert detect_format('{"process": 0}\n') == "jsonl"
    assert detect_format("; c\n{:process 0}\n") == "edn"
    assert detect_format("[{:process 0}]") == "edn"
    with pytest.raises(HistoryFormatError):
        detect_format("hello world\n")


def test_unknown_format_is_an_error() -> None:
    with pytest.raises(HistoryFormatError, match="unknown format"):
        parse_text("", "yaml")
