"""The shared JSONL reader scrimp.jsonl.read_jsonl: bad lines named with the reason and the expected
format, on_error="stop" listing them all before returning anything, on_error="skip" warning and keeping
the good lines, blank lines ignored, empty files and missing paths refused."""
import json
import warnings

import pytest

from scrimp.jsonl import MAX_LISTED, DataFileNotFound, read_jsonl

EXPECTED = 'a JSON object {"x": int}'


def _check(obj, line):
    if not isinstance(obj.get("x"), int) or isinstance(obj["x"], bool):
        raise ValueError(f"'x' is {obj.get('x')!r}, not an int")
    return {"line": line, "x": obj["x"]}


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_good_lines_with_blank_lines_between(tmp_path):
    path = _write(tmp_path / "d.jsonl", ['{"x": 1}', "", "   ", '{"x": 2, "other": "ignored"}'])
    assert read_jsonl(path, _check, EXPECTED) == [{"line": 1, "x": 1}, {"line": 4, "x": 2}]


@pytest.mark.parametrize("line, reason", [
    ("{not json", "not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
    ('{"x": 1', "not valid JSON (Expecting ',' delimiter at column 8)"),
    ("[1, 2]", "got a JSON list"),
    ('"text"', "got a JSON str"),
    ("null", "got a JSON null"),
    ('{"x": "one"}', "'x' is 'one', not an int"),
])
def test_each_kind_of_bad_line_names_the_line_the_reason_and_the_format(tmp_path, line, reason):
    path = _write(tmp_path / "d.jsonl", ['{"x": 1}', line])
    with pytest.raises(ValueError) as e:
        read_jsonl(path, _check, EXPECTED)
    assert f"d.jsonl:2: {reason}; expected {EXPECTED}" in str(e.value)
    assert "1 bad line(s)" in str(e.value)


def test_invalid_utf8_is_a_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"x": 1}\n{"x": "\xff"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not UTF-8 text \(byte 8\)"):
        read_jsonl(str(path), _check, EXPECTED)


def test_stop_lists_every_bad_line_up_to_the_limit(tmp_path):
    n_bad = MAX_LISTED + 5
    path = _write(tmp_path / "d.jsonl", ['{"x": 1}'] + ["[0]"] * n_bad + ['{"x": 2}'])
    calls = []

    def check(obj, line):
        calls.append(line)
        return _check(obj, line)

    with pytest.raises(ValueError) as e:
        read_jsonl(path, check, EXPECTED)
    msg = str(e.value)
    assert msg.startswith(f"{n_bad} bad line(s) in {path}; nothing was done:")
    for no in range(2, 2 + MAX_LISTED):
        assert f"d.jsonl:{no}: got a JSON list" in msg
    assert f"d.jsonl:{2 + MAX_LISTED}:" not in msg and "... and 5 more" in msg
    assert calls == [1, n_bad + 2]  # the whole file was read before raising


def test_skip_warns_per_bad_line_and_keeps_the_rest(tmp_path):
    path = _write(tmp_path / "d.jsonl", ['{"x": 1}', "[0]", '{"x": "a"}', '{"x": 3}'])
    with pytest.warns(UserWarning) as rec:
        out = read_jsonl(path, _check, EXPECTED, on_error="skip")
    assert out == [{"line": 1, "x": 1}, {"line": 4, "x": 3}]
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 2
    assert "d.jsonl:2: got a JSON list" in msgs[0] and "d.jsonl:3: 'x' is 'a'" in msgs[1]
    assert all("line skipped" in m and f"expected {EXPECTED}" in m for m in msgs)


def test_good_file_does_not_warn(tmp_path):
    path = _write(tmp_path / "d.jsonl", ['{"x": 1}'])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_jsonl(path, _check, EXPECTED, on_error="skip") == [{"line": 1, "x": 1}]


@pytest.mark.parametrize("lines, on_error", [([], "stop"), (["", "  "], "stop"), (["[0]"], "skip")])
def test_no_usable_line_is_an_error(tmp_path, lines, on_error):
    path = _write(tmp_path / "d.jsonl", lines)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"no usable lines.*expected one a JSON object"):
            read_jsonl(path, _check, EXPECTED, on_error=on_error)


def test_bad_arguments(tmp_path):
    path = _write(tmp_path / "d.jsonl", [json.dumps({"x": 1})])
    with pytest.raises(ValueError, match="on_error must be 'stop' or 'skip', got 'ignore'"):
        read_jsonl(path, _check, EXPECTED, on_error="ignore")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        read_jsonl(3, _check, EXPECTED)
    missing = str(tmp_path / "missing.jsonl")
    for err in (DataFileNotFound, FileNotFoundError, ValueError):
        with pytest.raises(err, match="no data file at .*missing.jsonl"):
            read_jsonl(missing, _check, EXPECTED)
    assert read_jsonl(tmp_path / "d.jsonl", _check, EXPECTED) == [{"line": 1, "x": 1}]
