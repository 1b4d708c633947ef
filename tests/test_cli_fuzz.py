"""The command line takes any argv: hypothesis-generated lists of option names
(minivmm.cli.OPTIONS and junk) and values drawn around each option's syntax
(sizes, keyval with ",," escapes, JSON for -object, Unicode, huge numbers)
give a parsed config or a CliError of one line that starts with the option,
never another exception. A sample of refused argv then goes through real
processes: status 1, one "minivmm: " line, no traceback. Generators in
tools/fuzz.py; every path or socket a value names is inside tmp, and only
argv that parse() refuses are ever run, so nothing starts, listens or writes."""

from __future__ import annotations

import sys
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import fuzz as fz  # noqa: E402

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=1500,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    return tmp_path_factory.mktemp("cli-arena")


@pytest.fixture(scope="module")
def seen(arena):
    """What parse() did with FUZZ's argv lists: outcomes by kind, the refused argv, the bad ones."""
    seen = {"outcomes": Counter(), "refused": [], "bad": []}

    @FUZZ
    @given(argv=fz.argv_lists(arena))
    def run(argv):
        out = fz.parse_outcome(argv)
        seen["outcomes"][out.kind] += 1
        if out.kind == "refused":
            seen["refused"].append(argv)
        elif out.kind != "parsed":
            seen["bad"].append((argv, out.detail))

    run()
    return seen


def test_any_argv_parses_or_is_refused_in_one_line(arena, seen):
    assert not seen["bad"], seen["bad"][:5]
    assert seen["outcomes"]["refused"] > 300 and seen["outcomes"]["parsed"] > 50, seen["outcomes"]
    assert not list(arena.iterdir()), "parse() must not create anything"


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "9" * 400],
        ["-m", "0x" + "f" * 40],
        ["-smp", "cpus=" + "9" * 5000],
        ["-object", '{"qom-type": "memory-backend-ram", "id": "m", "size": ' + "9" * 5000 + "}"],
        ["-object", "{" * 5000],
        ["-object", '{"qom-type": "memory-backend-ram", "id": "m", "size": 1e400}'],
        ["-object", "memory-backend-ram,id=m,size=1.5"],
        ["-object", '{"qom-type": "memory-backend-memfd", "id": ["m"], "size": "1M"}'],
        ["-object", '{"qom-type": "memory-backend-memfd", "id": "m", "size": {"a": 1}}'],
        ["-machine", "pc,memory-backend=\ud800"],
        ["-chardev", "socket,id=c,port=\u0661\u0662,host=127.0.0.1,server=on"],
        ["-qmp", "tcp:127.0.0.1:\u0661\u0662,server=on"],
        ["-incoming", "tcp:127.0.0.1:\u0661"],
        ["-smp", "\u0661"],
        ["-name", "\0"],
        ["-append", "x"],
        ["--", "-m"],
    ],
)
def test_known_odd_values(argv):
    """Each once found or feared; a config or a refusal, nothing else."""
    out = fz.parse_outcome(argv)
    assert out.kind in ("parsed", "refused"), out.detail


def test_refused_argv_through_real_processes(vmm, seen):
    refused = [a for a in seen["refused"] if fz.safe_for_a_process(a)]
    step = max(1, len(refused) // 15)
    sample = refused[::step][:15]
    problems = []
    for argv in sample:
        proc = vmm.start(*argv)
        try:
            _, err = proc.communicate(timeout=30)
        except Exception:
            vmm.kill(proc)
            problems.append((argv, "no exit in 30 s"))
            continue
        text = err.decode(errors="replace")
        if proc.returncode != 1 or text.count("\n") != 1 or not text.startswith("minivmm: ") or "Traceback" in text:
            problems.append((argv, proc.returncode, text[-300:]))
    assert len(sample) == 15 and not problems, problems


def test_the_longer_harness_briefly():
    assert fz.main(["cli", "--seconds", "2", "--real", "2"]) == 0


@pytest.mark.parametrize("argv", [["-m", "1\n2"], ["-display", "x\ry"], ["disk\n.img"], ["-chardev", "a\u2028b"]])
def test_a_value_with_a_line_break_still_gives_one_line(argv):
    out = fz.parse_outcome(argv)
    assert out.kind == "refused", out.detail


@pytest.mark.parametrize("value", ["", ",iobase=0xf4", "driver="])
def test_a_device_without_a_driver_is_refused(value):
    """Found by the fuzzing: `-device ''` raised KeyError: 'driver' (an internal error)."""
    from minivmm.cli import CliError, parse

    with pytest.raises(CliError, match=r"^-device .*Parameter 'driver' is missing$|^-device: Parameter 'driver'"):
        parse(["-device", value])
