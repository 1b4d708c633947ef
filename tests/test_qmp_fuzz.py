"""Random JSON and random bytes thrown at a live monitor (hypothesis): every
reply is a well-formed QMP message, the connection ends cleanly, and the
guest runs on unharmed."""

from __future__ import annotations

import json
import os
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import guest, still_walking, wait_for

# Commands that change nothing outside the monitor: anything else (quit, stop, pmemsave
# to a random path, human-monitor-command) could end the VM or write files.
SAFE = [
    "qmp_capabilities",
    "query-status",
    "query-version",
    "query-name",
    "query-kvm",
    "query-commands",
    "query-cpus-fast",
    "query-memdev",
    "getfd",
    "closefd",
]
UNSAFE = {"quit", "stop", "cont", "system_reset", "pmemsave", "memsave", "human-monitor-command"}

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4), max_leaves=20
)
commands = st.fixed_dictionaries(
    {"execute": st.sampled_from(SAFE) | st.text().filter(lambda t: t not in UNSAFE)},
    optional={"arguments": st.dictionaries(st.text(), values, max_size=3), "id": values},
)
payloads = (
    st.lists(commands | values, max_size=5).map(lambda items: b"".join(json.dumps(i).encode() for i in items))
    | st.binary(max_size=2048)
    | st.lists(
        st.sampled_from([b"{", b"}", b"[", b"]", b'"', b"\\", b",", b":", b" ", b"\n", b"x", b"\xff"]), max_size=200
    ).map(b"".join)
)
KINDS = {"return", "error", "event", "QMP"}


@pytest.fixture(scope="module")
def walker(tmp_path_factory):
    from conftest import Vmm

    cwd = tmp_path_factory.mktemp("fuzz")
    vmm = Vmm(cwd)
    sock = str(cwd / "qmp.sock")
    proc = vmm.start(
        "-kernel",
        guest("abwalk.elf"),
        "-m",
        "64",
        "-machine",
        "aux-ram-share=on",
        "-serial",
        "null",
        "-qmp",
        f"unix:{sock},server=on,wait=off",
    )
    wait_for(lambda: os.path.exists(sock), what="the QMP socket")
    ram = next(
        f"/proc/{proc.pid}/fd/{fd}"
        for fd in os.listdir(f"/proc/{proc.pid}/fd")
        if os.readlink(f"/proc/{proc.pid}/fd/{fd}").startswith("/memfd:pc.ram")
    )
    fd = os.open(ram, os.O_RDONLY)
    try:
        yield proc, sock, fd
    finally:
        os.close(fd)
        vmm.cleanup()


def _session(path: str, payload: bytes, negotiate: bool) -> list[dict]:
    """Send ``payload`` then EOF; every message until the server hangs up."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        wait_for(lambda: s.connect_ex(path) == 0, what="the monitor")
        if negotiate:
            s.sendall(b'{"execute": "qmp_capabilities"}')
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=payloads, negotiate=st.booleans())
def test_any_input_gets_well_formed_replies_and_the_guest_survives(walker, payload, negotiate):
    proc, sock, _fd = walker
    messages = _session(sock, payload, negotiate)
    assert messages and "QMP" in messages[0]
    for msg in messages:
        assert isinstance(msg, dict) and len(KINDS & msg.keys()) == 1, msg
        if "error" in msg:
            assert set(msg["error"]) == {"class", "desc"} and isinstance(msg["error"]["desc"], str)
    assert proc.poll() is None


def test_after_the_storm_the_guest_still_runs(walker):
    proc, sock, fd = walker
    still_walking(fd)
    replies = _session(sock, b'{"execute": "qmp_capabilities"}{"execute": "query-status"}', False)
    assert replies[-1]["return"]["status"] == "running"


# --- every command, arguments from and around its schema (tools/fuzz.py) -----------------------
#
# Four VMs, one per command group, each where what its commands do is fine: "main" (everything
# that keeps the VM: stop is followed by cont), "life" (quit, system_reset, human-monitor-command:
# a quit that succeeds must end the process with status 0, and a fresh VM takes over), "migrate"
# (a 4 MiB walker; file targets in tmp, at most 3 that succeed, then cont) and "incoming" (-incoming
# defer; unix sockets in tmp). Every reply is one well-formed message with the id echoed; a request
# the schema refuses gets an error naming a parameter it got wrong; nothing ends the VMM but quit.

import sys  # noqa: E402

from conftest import REPO  # noqa: E402

sys.path.insert(0, str(REPO / "tools"))
import fuzz as fz  # noqa: E402

SCHEMA = dict(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
EXAMPLES = {"main": 500, "life": 50, "migrate": 150, "incoming": 120}


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("fuzz-schema")
    procs = fz.Processes(cwd)
    made: dict[str, fz.QmpTarget] = {}
    try:
        for group in fz.GROUPS:
            made[group] = fz.QmpTarget(group, procs, cwd)
        yield made
    finally:
        for t in made.values():
            t.close()
        procs.close()
        assert procs.all_gone()


def test_every_command_is_in_a_group():
    from minivmm.monitor.commands import COMMANDS

    assert set(COMMANDS) == {n for names in fz.GROUPS.values() for n in names}


@pytest.mark.parametrize("group", list(fz.GROUPS))
def test_schema_fuzz(targets, group):
    target = targets[group]

    @settings(max_examples=EXAMPLES[group], **SCHEMA)
    @given(case=fz.cases(fz.GROUPS[group], target.arena))
    def run(case):
        target.case(case)
        assert not target.findings, target.findings

    run()
    tried = sum(n for k, n in target.tried.items() if k.startswith(f"{group}:"))
    assert tried >= EXAMPLES[group]
    refused = sum(n for k, n in target.tried.items() if k.startswith(f"{group}:") and not k.endswith(":valid"))
    assert refused and tried - refused, target.tried  # both sides of the schema exercised


def test_after_the_schema_storm_every_guest_runs_and_no_fd_leaked(targets):
    problems = [p for t in targets.values() for p in t.verdict()]
    assert not problems, problems
    leaks = {g: t.leaked_fds() for g, t in targets.items()}
    assert all(n <= 0 for n in leaks.values()), leaks
    assert targets["life"].quits > 0  # quit was really fuzzed: it ended VMs, and only it did
    assert targets["main"].started == targets["migrate"].started == targets["incoming"].started == 1
