"""QEMU's value syntaxes: sizes, booleans, keyval lists and JSON objects."""

import pytest

from minivmm.options import OptionError, parse_bool, parse_keyval, parse_object, parse_size


@pytest.mark.parametrize(
    "text,unit,expected",
    [
        ("512", "M", 512 << 20),
        ("1G", "M", 1 << 30),
        ("1g", "M", 1 << 30),
        ("1.5G", "M", 3 << 29),
        ("4096", "B", 4096),
        ("64K", "B", 64 << 10),
        ("2T", "B", 2 << 40),
        ("0x1000", "B", 0x1000),
    ],
)
def test_sizes(text, unit, expected):
    assert parse_size(text, unit) == expected


@pytest.mark.parametrize("text", ["", "abc", "1X", "-1", "0", "1.5", "0x10K"])
def test_bad_sizes_name_the_value(text):
    with pytest.raises(OptionError) as e:
        parse_size(text)
    assert repr(text)[1:-1] in str(e.value) or text == ""


def test_keyval_implied_key_and_escaped_comma():
    assert parse_keyval("memory-backend-memfd,id=m,size=1G", "qom-type") == {
        "qom-type": "memory-backend-memfd",
        "id": "m",
        "size": "1G",
    }
    assert parse_keyval("file,path=a,,b", "backend") == {"backend": "file", "path": "a,b"}


@pytest.mark.parametrize("text,message", [("a,b", "Expected '='"), ("x=1,x=2", "more than once"), ("=1", "Invalid")])
def test_keyval_errors(text, message):
    with pytest.raises(OptionError, match=message):
        parse_keyval(text)


def test_json_objects():
    got = parse_object('{"qom-type": "memory-backend-memfd", "id": "r", "size": 1048576, "share": true}', "qom-type")
    assert got == {"qom-type": "memory-backend-memfd", "id": "r", "size": "1048576", "share": "on"}
    with pytest.raises(OptionError, match="JSON parse error"):
        parse_object("{nope", "qom-type")


def test_booleans():
    assert parse_bool("share", "on") and parse_bool("share", "yes") and parse_bool("share", "true")
    assert not (parse_bool("share", "off") or parse_bool("share", "no") or parse_bool("share", "false"))
    with pytest.raises(OptionError, match="'share' expects 'on' or 'off'"):
        parse_bool("share", "maybe")
