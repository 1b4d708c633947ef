#!/usr/bin/env python3
"""Fuzz minivmm's QMP monitor, its command line and its guest-facing devices.

    python tools/fuzz.py qmp --seconds 60      every QMP command, arguments drawn from and around its schema
    python tools/fuzz.py cli --seconds 60      argv lists into minivmm.cli.parse, a sample through real processes
    python tools/fuzz.py guest --seeds 20      the portfuzz guest at many seeds
    python tools/fuzz.py all --seconds 60

Each prints what it tried, per category, and its findings (crashes, hangs,
malformed replies), and exits 1 if there are any. tests/test_qmp_fuzz.py,
tests/test_cli_fuzz.py and tests/test_guest_fuzz.py run the same generators
briefly, with hypothesis's fixed seed. Every minivmm started here runs in its
own process group in a temporary directory and is killed at the end; every
file name and socket a generated input can reach is inside that directory.
(tools/fuzz_stream.py does the migration stream.)
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from minivmm import guests  # noqa: E402
from minivmm.monitor.commands import COMMANDS, INT64, MAX_ITEMS, MAX_STR, Arg  # noqa: E402
from minivmm.options import OptionError  # noqa: E402
from minivmm.vmprocess import kill_group  # noqa: E402

# --- processes ------------------------------------------------------------------------------------


class Processes:
    """minivmm children, each in its own process group, all killed at the end."""

    def __init__(self, cwd: Path) -> None:
        self.cwd, self.procs = cwd, []

    def start(self, *args: str, stdout=subprocess.DEVNULL) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "minivmm", *args],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            cwd=self.cwd,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    kill = staticmethod(kill_group)

    def close(self) -> None:
        for proc in self.procs:
            self.kill(proc)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()

    def all_gone(self) -> bool:
        return all(p.poll() is not None for p in self.procs)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def ram_fd(pid: int) -> int:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:pc.ram"):
            return os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY)
    raise RuntimeError(f"no pc.ram memfd in process {pid}")


def passes(fd: int) -> int:
    from minivmm.guests.abwalk import read_status

    status = read_status(fd)
    return status.passes if status else 0


def wait_until(predicate: Callable[[], object], timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    return None


def walker_args(ram_mib: int = 64) -> list[str]:
    return ["-kernel", guests.path("abwalk.elf"), "-m", str(ram_mib), "-machine", "aux-ram-share=on", "-serial", "null"]


# --- QMP: a raw client ----------------------------------------------------------------------------


class Hangup(Exception):
    """The monitor closed the connection."""


class Client:
    """Exactly the bytes we write; replies one JSON line each, events skipped and counted."""

    def __init__(self, path: str, timeout: float = 20) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.events: list[str] = []
        self.greeting = self.read()
        assert "QMP" in self.greeting, self.greeting
        assert self.command("qmp_capabilities") == {"return": {}}

    def read(self) -> dict:
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(1 << 16)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise Hangup
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line, parse_constant=_no_constant)

    def request(self, text: bytes) -> dict:
        """Send one request; its reply (events before it skipped)."""
        self.sock.sendall(text)
        while True:
            msg = self.read()
            if isinstance(msg, dict) and "event" in msg:
                self.events.append(msg["event"])
                continue
            return msg

    def extra(self) -> list[dict]:
        """Non-event messages that arrived after the last reply (there must be none)."""
        out = []
        while b"\n" in self.buf or select.select([self.sock], [], [], 0)[0]:
            try:
                msg = self.read()
            except Hangup:
                break
            if not (isinstance(msg, dict) and "event" in msg):
                out.append(msg)
        return out

    def command(self, name: str, **arguments) -> dict:
        return self.request(json.dumps({"execute": name, **({"arguments": arguments} if arguments else {})}).encode())

    def close(self) -> None:
        self.sock.close()


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def check_reply(reply: object, request_id: object, has_id: bool) -> str | None:
    """What is wrong with a reply, or None: one of return/error, error with class and desc, the id echoed."""
    if not isinstance(reply, dict):
        return f"reply is not an object: {reply!r}"
    kinds = {"return", "error"} & reply.keys()
    if len(kinds) != 1 or set(reply) - {"return", "error", "id"}:
        return f"reply is not one return or error: {reply!r}"
    if "error" in reply:
        err = reply["error"]
        if not (isinstance(err, dict) and set(err) == {"class", "desc"} and isinstance(err["desc"], str)):
            return f"malformed error: {reply!r}"
        if not isinstance(err["class"], str) or not err["desc"]:
            return f"malformed error: {reply!r}"
    if has_id and ("id" not in reply or reply["id"] != request_id):
        return f"id not echoed (sent {request_id!r}): {reply!r}"
    if not has_id and "id" in reply:
        return f"an id nobody sent: {reply!r}"
    return None


# --- QMP: arguments from and around each command's schema ----------------------------------------


@dataclass
class Arena:
    """Where generated inputs may point: a scratch directory, its sockets and files."""

    tmp: Path
    runs_migrations: bool = False
    file_migrations_left: int = 3  # each writes the whole (4 MiB) guest: bounded

    def paths(self) -> list[str]:
        t = self.tmp
        return [
            str(t / "save.bin"),
            "rel-save.bin",  # relative: the VMM's cwd, which is tmp
            str(t),  # a directory
            str(t / "no-such-dir" / "x"),
            str(t / "fifo"),
            str(t / "link-to-dir"),
            str(t) + "/" + "a" * 300,  # a name too long for the file system
        ]

    def setup(self) -> None:
        if not (self.tmp / "fifo").exists():
            os.mkfifo(self.tmp / "fifo")
        if not (self.tmp / "link-to-dir").exists():
            os.symlink(self.tmp, self.tmp / "link-to-dir")


@dataclass
class Case:
    """One generated request, and what the schema says about it."""

    command: str
    arguments: dict | None
    bad: set[str] = field(default_factory=set)  # keys the schema must refuse (any one may be named)
    request_id: object = None
    has_id: bool = False
    category: str = "valid"

    def text(self) -> bytes:
        req: dict = {"execute": self.command}
        if self.arguments is not None:
            req["arguments"] = self.arguments
        if self.has_id:
            req["id"] = self.request_id
        return json.dumps(req).encode()  # ensure_ascii: a lone surrogate goes out as "\ud800"

    def __repr__(self) -> str:
        text = self.text().decode()
        return f"<{self.category} {text[:300]}{'...' if len(text) > 300 else ''}>"


WRONG_TYPES = {
    "int": st.sampled_from([True, False, 1.5, "1", None, [1], {"a": 1}]),
    "str": st.sampled_from([0, True, None, 1.0, ["x"], {"x": "y"}]),
    "bool": st.sampled_from([0, 1, "true", "on", None, [True]]),
    "list": st.sampled_from([0, "x", None, True, {"0": 1}]),
    "object": st.sampled_from([0, "x", None, [], True]),
}
SURROGATES = st.sampled_from(["\ud800", "a\udfff", "\udbff\udc00\ud800", "x" * 10 + "\udc80"])


def bad_strings(max_len: int) -> st.SearchStrategy:
    return st.one_of(
        st.text(max_size=8).map(lambda t: t + "\0" + t),
        SURROGATES,
        st.just("y" * (max_len + 1)),
        st.integers(1, 3).map(lambda n: "z" * (max_len + n)),
    )


def int_values(arg: Arg, valid: st.SearchStrategy | None = None) -> st.SearchStrategy:
    lo, hi = arg.range
    edges = [v for v in (lo, hi, 0, -1, 1) if lo <= v <= hi]
    good = valid if valid is not None else st.one_of(st.sampled_from(edges), st.integers(lo, hi))
    bad = st.one_of(
        st.sampled_from([lo - 1, hi + 1, 1 << 64, -(1 << 64), 10**40]),
        WRONG_TYPES["int"],
    )
    return st.one_of(good.map(lambda v: (v, False)), bad.map(lambda v: (v, True)))


def str_values(arg: Arg, valid: st.SearchStrategy | None = None) -> st.SearchStrategy:
    limit = arg.max_len or MAX_STR
    any_text = st.text(max_size=40).filter(lambda t: "\0" not in t)
    good = valid if valid is not None else st.one_of(any_text, st.just("k" * limit))
    bad = st.one_of(bad_strings(limit), WRONG_TYPES["str"])
    return st.one_of(good.map(lambda v: (v, False)), bad.map(lambda v: (v, True)))


def list_values(arg: Arg, item: st.SearchStrategy) -> st.SearchStrategy:
    """``item`` draws (value, bad) pairs for one element."""
    limit = arg.max_len or MAX_ITEMS

    def assemble(pairs):
        return [v for v, _ in pairs], any(b for _, b in pairs)

    good_item = item.filter(lambda p: not p[1])
    return st.one_of(
        st.lists(item, max_size=4).map(assemble),
        st.just(limit)
        .flatmap(lambda n: st.lists(good_item, min_size=1, max_size=1).map(lambda p: (p[0][0],) * n))
        .map(lambda t: (list(t), False)),
        st.just(([0] * (limit + 1), True)),
        WRONG_TYPES["list"].map(lambda v: (v, True)),
    )


def object_values() -> st.SearchStrategy:
    return st.dictionaries(st.text(max_size=8), st.none() | st.integers() | st.text(max_size=8), max_size=3)


def bool_values() -> st.SearchStrategy:
    return st.one_of(st.booleans().map(lambda v: (v, False)), WRONG_TYPES["bool"].map(lambda v: (v, True)))


def _scheme_free(t: str) -> bool:
    return ":" not in t and "\0" not in t


def special(command: str, key: str, arena: Arena) -> st.SearchStrategy | None:
    """Valid values that stay inside the arena (files, sockets) and bounded (sizes)."""
    paths = st.sampled_from(arena.paths())
    t = arena.tmp
    if key == "filename":
        return paths
    if command in ("pmemsave", "memsave") and key == "size":
        return st.one_of(st.integers(0, 65536), st.sampled_from([INT64[1], 4096]))
    if command == "migrate" and key == "uri":
        uris = [
            f"file:{t}",  # a directory
            f"file:{t}/no-such-dir/m",
            f"file:{t}/fifo",
            f"unix:{t}/nobody.sock",
            f"unix:{t}/" + "s" * 200,  # longer than sun_path
            "tcp:127.0.0.1:1",
            "tcp:127.0.0.1:99999",
            "fd:no-such-fd",
            "exec:true",
            f"file:{t}/mig.state",  # succeeds: a 4 MiB guest, bounded by Arena.file_migrations_left
            f"file:{t}/mig.state,offset=4096",
        ]
        return st.one_of(st.sampled_from(uris), st.text(max_size=20).filter(_scheme_free))
    if command == "migrate-incoming" and key == "uri":
        return st.one_of(
            st.sampled_from([f"unix:{t}/in.sock", "tcp:0.0.0.0:0", "exec:true", f"unix:{t}/" + "s" * 200]),
            st.text(max_size=20).filter(_scheme_free),
        )
    if key == "command-line":
        lines = ["info status", "info registers", "info mtree", "info cpus", "info", "info nope", "help", "?"]
        lines += ["stop", "s", "cont", "c", "system_reset", "quit", "q", "", "   ", "info version extra"]
        return st.one_of(st.sampled_from(lines), st.text(max_size=30))
    if key == "mode":
        return st.sampled_from(["normal", "cpr-reboot", "cpr-transfer", "cpr-exec", "warp", ""])
    return None


def channel_objects(arena: Arena) -> st.SearchStrategy:
    t = arena.tmp
    addrs = st.one_of(
        st.fixed_dictionaries(
            {"transport": st.just("file"), "filename": st.sampled_from(arena.paths())},
            optional={"offset": st.sampled_from([0, 4096, -1, "abc", 1 << 70])},
        ),
        st.fixed_dictionaries(
            {"transport": st.just("socket"), "type": st.sampled_from(["unix", "inet", "fd", "vsock"])},
            optional={
                "path": st.sampled_from([f"{t}/nobody.sock", 7, ""]),
                "host": st.sampled_from(["127.0.0.1", "0.0.0.0", "::1"]),
                "port": st.sampled_from(["1", "99999", "x", 5]),
                "str": st.sampled_from(["no-such-fd", "3"]),
            },
        ),
        st.fixed_dictionaries({"transport": st.sampled_from(["exec", "rdma", "", None])}),
        object_values(),
    )
    return st.one_of(
        st.fixed_dictionaries({"channel-type": st.sampled_from(["main", "main", "cpr", "other", 3]), "addr": addrs}),
        object_values(),
    )


def capability_objects() -> st.SearchStrategy:
    return st.one_of(
        st.fixed_dictionaries(
            {
                "capability": st.sampled_from(["events", "x-ignore-shared", "return-path", "postcopy-ram", ""]),
                "state": st.sampled_from([True, False, 1, "on", None]),
            }
        ),
        object_values(),
    )


def _ok(value: object) -> tuple[object, bool]:
    return value, False


def _refused(value: object) -> tuple[object, bool]:
    return value, True


def arg_values(command: str, key: str, arg: Arg, arena: Arena) -> st.SearchStrategy:
    """(value, the schema refuses it) pairs."""
    valid = special(command, key, arena)
    if arg.kind == "int":
        return int_values(arg, valid)
    if arg.kind == "str":
        return str_values(arg, valid)
    if arg.kind == "bool":
        return bool_values()
    if arg.kind == "object":
        return st.one_of(object_values().map(lambda v: (v, False)), WRONG_TYPES["object"].map(lambda v: (v, True)))
    # lists
    if key == "channels":
        item = st.one_of(channel_objects(arena).map(_ok), WRONG_TYPES["object"].map(_refused))
    elif key == "capabilities":
        item = st.one_of(capability_objects().map(_ok), WRONG_TYPES["object"].map(_refused))
    elif key == "cpr-exec-command":
        item = str_values(Arg("str"), st.sampled_from([str(arena.tmp / "no-such-minivmm"), "-incoming", "defer"]))
    elif arg.items == "str":
        item = str_values(Arg("str"), st.sampled_from(["oob", "x", ""]))
    else:
        item = st.one_of(object_values().map(lambda v: (v, False)))
    return list_values(arg, item)


IDS = st.one_of(
    st.integers(-(1 << 70), 1 << 70),
    st.text(max_size=10),
    st.lists(st.integers(0, 9), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(0, 9), max_size=2),
    st.none(),
    st.booleans(),
)


@st.composite
def cases(draw, commands: list[str], arena: Arena) -> Case:
    name = draw(st.sampled_from(commands))
    cmd = COMMANDS[name]
    arguments: dict = {}
    bad: set[str] = set()
    categories = []
    for key, arg in cmd.args.items():
        choice = draw(st.sampled_from(["omit", "value", "value", "value"]))
        if choice == "omit":
            if arg.required:
                bad.add(key)
                categories.append("missing")
            continue
        value, refused = draw(arg_values(name, key, arg, arena))
        arguments[key] = value
        if refused:
            bad.add(key)
            categories.append("bad-value")
    if draw(st.integers(0, 5)) == 0:
        extra = draw(st.one_of(st.text(max_size=12), SURROGATES, st.just("a\0b")).filter(lambda k: k not in cmd.args))
        arguments[extra] = draw(st.none() | st.integers() | st.text(max_size=5))
        bad.add(extra)
        categories.append("unexpected")
    no_arguments = not arguments and draw(st.booleans())
    has_id = draw(st.booleans())
    request_id = draw(IDS) if has_id else None
    category = categories[0] if categories else "valid"
    return Case(name, None if no_arguments else arguments, bad, request_id, has_id, category)


def schema_problem(case: Case, reply: dict) -> str | None:
    """A request the schema refuses must get an error naming one of the offending parameters."""
    if not case.bad:
        return None
    if "error" not in reply:
        return f"schema violation accepted: {reply!r}"
    desc = reply["error"]["desc"]
    wire = [json.loads(json.dumps(b)) for b in case.bad]  # as the server reads them: "\udbff\udc00" is one character
    names = {k for b in wire for k in (b, b.replace("-", "_"))}
    if not any(f"'{k}" in desc for k in names):
        return f"error does not name {sorted(case.bad)}: {desc!r}"
    return None


# command groups: each runs against its own VM, where what it does is fine
LIFE = ["quit", "system_reset", "human-monitor-command", "stop", "cont", "query-status"]
MIGRATE = [
    "migrate",
    "migrate_cancel",
    "query-migrate",
    "migrate-set-parameters",
    "migrate-set-capabilities",
    "query-migrate-parameters",
    "cont",
]
INCOMING = ["migrate-incoming", "query-migrate", "query-status", "migrate-set-capabilities"]
ELSEWHERE = {"quit", "system_reset", "human-monitor-command", "migrate", "migrate-incoming"}
MAIN = [n for n in COMMANDS if n not in ELSEWHERE]
GROUPS = {"main": MAIN, "life": LIFE, "migrate": MIGRATE, "incoming": INCOMING}


class QmpTarget:
    """A live VM for one command group, restarted if a quit ends it; findings collected, not raised."""

    def __init__(self, group: str, procs: Processes, tmp: Path) -> None:
        self.group, self.procs = group, procs
        self.tmp = tmp / group
        self.tmp.mkdir(exist_ok=True)
        self.arena = Arena(self.tmp, runs_migrations=group == "migrate")
        self.arena.setup()
        self.findings: list[tuple[Case, str]] = []
        self.tried: Counter[str] = Counter()
        self.started = 0
        self.quits = 0
        self.proc = self.client = self.ram = None
        self.start()
        self.fds_before = fd_count(self.proc.pid)

    def args(self) -> list[str]:
        if self.group == "migrate":
            return walker_args(4)
        if self.group == "incoming":
            return [*walker_args(4), "-incoming", "defer"]
        return walker_args(64)

    def start(self) -> None:
        self.started += 1
        sock = str(self.tmp / f"qmp{self.started}.sock")
        self.proc = self.procs.start(*self.args(), "-qmp", f"unix:{sock},server=on,wait=off")
        if not wait_until(lambda: self.proc.poll() is not None or _connectable(sock), 30):
            raise RuntimeError(f"{self.group}: no QMP socket")
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.group}: minivmm exited: {self.proc.stderr.read().decode()}")
        self.client = Client(sock)
        if self.ram is not None:
            os.close(self.ram)
        self.ram = ram_fd(self.proc.pid)

    def case(self, case: Case) -> None:
        self.tried[f"{self.group}:{case.category}"] += 1
        self.tried[f"command:{case.command}"] += 1
        if case.command == "migrate" and case.arguments and "mig.state" in str(case.arguments.get("uri", "")):
            if self.arena.file_migrations_left <= 0:
                case.arguments["uri"] = f"file:{self.tmp}/no-such-dir/m"
            else:
                self.arena.file_migrations_left -= 1
        try:
            reply = self.client.request(case.text())
        except Hangup:
            self._ended(case, None)
            return
        except TimeoutError:
            self.findings.append((case, "hang: no reply in 20 s"))
            self._restart()
            return
        problem = check_reply(reply, case.request_id, case.has_id) or schema_problem(case, reply)
        if problem is None:
            extra = self.client.extra()
            if extra:
                problem = f"more than one reply: {extra!r}"
        if problem:
            self.findings.append((case, problem))
        if "error" in reply and reply["error"]["desc"].startswith("internal error"):
            self.findings.append((case, f"internal error: {reply['error']['desc']}"))
        self._restore(case, reply)

    def _quit_asked(self, case: Case, reply: dict | None) -> bool:
        if reply is not None and "return" not in reply:
            return False
        if case.command == "quit":
            return True
        line = (case.arguments or {}).get("command-line")
        hmp = case.command == "human-monitor-command" and isinstance(line, str)
        return hmp and line.split()[:1] in (["quit"], ["q"])

    def _ended(self, case: Case, reply: dict | None) -> None:
        status = self.proc.wait(20) if wait_until(lambda: self.proc.poll() is not None, 20) else None
        if not self._quit_asked(case, reply) or status != 0:
            err = self.proc.stderr.read().decode(errors="replace") if status is not None else ""
            self.findings.append((case, f"the VMM ended (status {status}) without a quit: {err[-500:]!r}"))
        self.quits += 1
        self._restart()

    def _restart(self) -> None:
        self.client.close()
        Processes.kill(self.proc)
        self.start()

    def _restore(self, case: Case, reply: dict) -> None:
        """Undo what a valid command did to the VM's state, so the next one finds it running."""
        if self._quit_asked(case, reply):
            try:
                self.client.read()  # the SHUTDOWN event, then the hangup
                self.client.read()
            except (Hangup, TimeoutError):
                pass
            self._ended(case, reply)
            return
        if self.group == "migrate" and case.command == "migrate" and "return" in reply:
            info = wait_until(
                lambda: (
                    (q := self.client.command("query-migrate")["return"]).get("status")
                    in ("completed", "failed", "cancelled")
                    and q
                ),
                30,
            )
            self.tried[f"migration {info['status'] if info else 'hung'}"] += 1
            if not info:
                self.findings.append((case, "hang: the migration did not end in 30 s"))
                self.client.command("migrate_cancel")
                wait_until(lambda: self.client.command("query-migrate")["return"].get("status") != "active", 10)
        if self.group in ("main", "life", "migrate"):
            status = self.client.command("query-status")["return"]["status"]
            if status in ("paused", "postmigrate"):
                self.client.command("cont")

    def verdict(self, walk_timeout: float = 60) -> list[str]:
        """After the storm: the process is there, query-status answers, the guest walks."""
        problems = []
        if self.proc.poll() is not None:
            return [f"{self.group}: the VMM exited"]
        try:
            status = self.client.command("query-status")["return"]["status"]
        except Exception as e:  # noqa: BLE001 - a finding
            return [f"{self.group}: query-status failed: {type(e).__name__}: {e}"]
        want = "inmigrate" if self.group == "incoming" else "running"
        if status != want:
            problems.append(f"{self.group}: status {status}, expected {want}")
        if self.group != "incoming":
            before = passes(self.ram)
            if not wait_until(lambda: passes(self.ram) > before + 1, walk_timeout):
                problems.append(f"{self.group}: the walker stopped walking ({before} passes)")
        return problems

    def leaked_fds(self) -> int:
        """fds the VMM holds now beyond those it held after its first connection (same process only)."""
        if self.started != 1 or self.group == "incoming":  # migrate-incoming listens: one more fd, rightly
            return 0
        return fd_count(self.proc.pid) - self.fds_before

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.ram is not None:
            os.close(self.ram)
            self.ram = None


def _connectable(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class StopFuzzing(Exception):
    pass


def run_given(strategy: st.SearchStrategy, body: Callable, examples: int, seconds: float | None, seed: int | None):
    """Run ``body`` on ``examples`` draws (or until ``seconds`` pass); no shrinking, findings are the body's."""
    deadline = None if seconds is None else time.monotonic() + seconds
    s = settings(
        derandomize=seed is None,
        database=None,
        deadline=None,
        max_examples=examples,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )

    @s
    @given(strategy)
    def inner(value):
        if deadline is not None and time.monotonic() > deadline:
            raise StopFuzzing
        body(value)

    if seed is not None:
        from hypothesis import seed as hseed

        inner = hseed(seed)(inner)
    try:
        inner()
    except StopFuzzing:
        pass


def fuzz_qmp(seconds: float, seed: int) -> int:
    findings: list[tuple[str, str]] = []
    tried: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="fuzz-qmp-") as tmp:
        procs = Processes(Path(tmp))
        targets = []
        try:
            for group, names in GROUPS.items():
                target = QmpTarget(group, procs, Path(tmp))
                targets.append(target)
                run_given(cases(names, target.arena), target.case, 10**9, seconds / len(GROUPS), seed)
                findings += [(repr(c), what) for c, what in target.findings]
                findings += [("after the storm", p) for p in target.verdict()]
                leaked = target.leaked_fds()
                tried[f"{group}: fd growth"] = leaked
                if leaked > 0:
                    findings.append((group, f"the VMM holds {leaked} more fds than before the storm"))
                tried.update(target.tried)
                tried[f"{group}: VMs started"] = target.started
        finally:
            for t in targets:
                t.close()
            procs.close()
            if not procs.all_gone():
                findings.append(("cleanup", "a VMM process survived"))
    return report("QMP requests", tried, findings)


def report(what: str, tried: Counter, findings: list[tuple[str, str]]) -> int:
    total = sum(n for k, n in tried.items() if ":" in k and not k.startswith("command:") and " " not in k)
    print(f"{what}: {total}")
    for key, n in sorted(tried.items()):
        print(f"  {key}: {n}")
    print(f"findings: {len(findings)}")
    for where, what_ in findings[:30]:
        print(f"  {where}: {what_}")
    return 1 if findings else 0


# --- the command line ------------------------------------------------------------------------------

# Options that could start something lasting, write a file or listen: their values always point
# into the arena, or (in the real-process sample) the argv must be one parse() refuses.
DANGEROUS = {"qmp", "incoming", "pidfile", "serial", "chardev", "mon", "object", "kernel", "bios", "initrd"}

SIZES = st.one_of(
    st.sampled_from(["0", "1", "2", "16", "64M", "1G", "1.5G", "0x1000", "0x", "1.", ".5M", "1e3", "-1", "1Z", " 8 "]),
    st.sampled_from(["9" * 24, "9" * 25, "9" * 400, "0x" + "f" * 40, "1E", "16E", "1P", "18446744073709551616"]),
    st.integers(-(1 << 70), 1 << 70).map(str),
    st.tuples(st.integers(0, 1 << 20), st.sampled_from(["", "k", "K", "M", "g", "T", "B", "b", "e", "x"])).map(
        lambda t: f"{t[0]}{t[1]}"
    ),
)
JUNK = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", ",", ",,", "=", "a=", "=b", ",a=1", "a=1,,", "a=1,a=2", "\0", "\ud800", "é,ü=ß", "x" * 5000]),
)
KEYVAL_KEYS = [
    "id",
    "size",
    "share",
    "hugetlb",
    "prealloc",
    "mem-path",
    "cpus",
    "sockets",
    "cores",
    "threads",
    "maxcpus",
    "dies",
    "accel",
    "type",
    "memory-backend",
    "aux-ram-share",
    "path",
    "server",
    "wait",
    "append",
    "backend",
    "host",
    "port",
    "fd",
    "mode",
    "chardev",
    "pretty",
    "iobase",
    "iosize",
    "ioport",
    "driver",
    "property",
    "value",
    "guest",
    "panic",
    "reboot",
    "shutdown",
    "signal",
    "telnet",
]
WORDS = st.one_of(
    st.sampled_from(
        [
            "on",
            "off",
            "yes",
            "no",
            "true",
            "maybe",
            "kvm",
            "tcg",
            "pc",
            "q35",
            "microvm",
            "host",
            "+x2apic",
            "-vmx",
            "memory-backend-memfd",
            "memory-backend-file",
            "memory-backend-ram",
            "socket",
            "file",
            "stdio",
            "null",
            "none",
            "isa-debug-exit",
            "pvpanic",
            "control",
            "readline",
            "pause",
            "shutdown",
            "exit-failure",
            "reset",
            "poweroff",
            "0x501",
            "0xf4",
            "4",
            "99999",
            "127.0.0.1",
            "0.0.0.0",
            "localhost",
            "postcode",
            "m1",
            "c1",
        ]
    ),
    SIZES,
    st.text(max_size=8),
)


def keyval(first: st.SearchStrategy) -> st.SearchStrategy:
    pair = st.tuples(st.sampled_from(KEYVAL_KEYS) | st.text(max_size=5), WORDS).map(lambda kv: f"{kv[0]}={kv[1]}")
    escaped = WORDS.map(lambda w: w.replace(",", ",,"))
    items = st.lists(st.one_of(pair, pair, escaped, st.sampled_from(["", "server", "nowait", "wait"])), max_size=6)
    return st.tuples(first, items).map(lambda t: ",".join([t[0], *t[1]]) if t[0] else ",".join(t[1]))


def json_objects() -> st.SearchStrategy:
    values = st.recursive(
        st.none() | st.booleans() | st.integers(-(1 << 80), 1 << 80) | st.floats(allow_nan=False) | WORDS,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=8,
    )
    obj = st.dictionaries(st.sampled_from(["qom-type", "id", "size", "share", "mem-path", "x"]), values, max_size=5)
    return st.one_of(
        obj.map(json.dumps),
        st.sampled_from(["{", "{}", "[1]", "{" * 5000, '{"a": ' + "9" * 5000 + "}", '{"id": NaN}', ' {"id":1']),
    )


def option_values(name: str, arena: Path) -> st.SearchStrategy:
    t = str(arena)
    safe_paths = st.sampled_from([f"{t}/p", f"{t}/no-such-dir/p", t, f"{t}/" + "n" * 300])
    if name == "m":
        return st.one_of(SIZES, keyval(st.sampled_from(["", "size=1G", "size=64M"])))
    if name == "smp":
        return st.one_of(keyval(st.sampled_from(["1", "2", "0", "-1", "x", "999999", ""])), SIZES)
    if name == "object":
        return st.one_of(
            keyval(st.sampled_from(["memory-backend-memfd", "memory-backend-ram", "memory-backend-file", "x", ""])),
            json_objects(),
        )
    if name in ("qmp",):
        return st.one_of(
            st.sampled_from([f"unix:{t}/q.sock", f"unix:{t}/q.sock,server=on,wait=off", "unix:", "tcp:"]).flatmap(
                lambda base: keyval(st.just(base))
            ),
            st.sampled_from(["tcp:0.0.0.0:4444,server=on", "tcp:localhost:99999", "tcp::1:x", "stdio", "vc"]),
        )
    if name == "chardev":
        return keyval(st.sampled_from(["socket", "file", "stdio", "null", "vc", ""])).map(
            lambda v: v.replace("path=", f"path={t}/")
        )
    if name == "serial":
        return st.one_of(
            st.sampled_from(["stdio", "null", "none", "vc", "file:", "unix:", "chardev:nope", "pty"]),
            safe_paths.map(lambda p: "file:" + p),
            safe_paths.flatmap(lambda p: keyval(st.just("unix:" + p))),
        )
    if name == "incoming":
        return st.one_of(
            st.sampled_from(["defer", "", "exec:true", "tcp:0.0.0.0:0", "tcp:127.0.0.1:99999", "rdma:x", "fd:x"]),
            safe_paths.map(lambda p: "file:" + p + ",offset=" + "9" * 30),
            safe_paths.map(lambda p: "unix:" + p),
            json_objects(),
            keyval(st.sampled_from(["cpr", "main", ""])),
        )
    if name in ("pidfile", "kernel", "bios", "initrd"):
        return safe_paths
    if name == "mon":
        return keyval(st.sampled_from(["chardev=c1", "c1", "", "chardev=nope"]))
    if name in ("machine", "M", "accel", "device", "display", "action", "name", "d", "cpu", "global"):
        return st.one_of(keyval(WORDS), JUNK)
    return st.one_of(WORDS, JUNK)


LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines splits on


def argv_lists(arena: Path) -> st.SearchStrategy:
    """argv lists: option names and junk, values drawn around each option's syntax (line breaks too)."""
    from minivmm.cli import OPTIONS

    names = sorted(OPTIONS)

    @st.composite
    def one(draw) -> list[str]:
        argv: list[str] = []
        for _ in range(draw(st.integers(0, 6))):
            kind = draw(st.integers(0, 9))
            if kind == 0:
                argv.append(draw(st.one_of(JUNK, st.sampled_from(["-", "--", "-nope", "--m", "-kvm", "disk.img"]))))
                continue
            name = draw(st.sampled_from(names))
            argv.append(draw(st.sampled_from(["-", "-", "--"])) + name)
            takes_value = OPTIONS[name][0]
            if takes_value and draw(st.integers(0, 15)):
                argv.append(draw(st.one_of(option_values(name, arena), option_values(name, arena), JUNK)))
        if draw(st.integers(0, 9)) == 0 and argv:  # a line break somewhere: the error must stay one line
            at = draw(st.integers(0, len(argv) - 1))
            argv[at] += draw(st.sampled_from(LINE_BREAKS)) + "x"
        return argv

    return one()


@dataclass
class CliOutcome:
    kind: str  # "parsed", "refused", "bad-message", "crash"
    detail: str = ""


def parse_outcome(argv: list[str]) -> CliOutcome:
    """minivmm.cli.parse on ``argv``: a config, or CliError with one line naming the option."""
    from minivmm.cli import CliError, parse

    try:
        parse(argv)
    except CliError as e:
        msg = str(e)
        if len(msg.splitlines()) > 1:
            return CliOutcome("bad-message", f"more than one line: {msg!r}")
        if not msg:
            return CliOutcome("bad-message", "empty message")
        if not _names_an_option(msg, argv):
            return CliOutcome("bad-message", f"does not start with an option: {msg!r}")
        return CliOutcome("refused", msg)
    except (OptionError, Exception) as e:  # noqa: BLE001 - a finding
        return CliOutcome("crash", f"{type(e).__name__}: {e}")
    return CliOutcome("parsed")


def _names_an_option(msg: str, argv: list[str]) -> bool:
    """The message starts with a word of argv (the option, or a stray argument, as printed) or a -option."""
    from minivmm.cli import printable

    head = msg.split(":", 1)[0]
    if head.startswith("-"):
        return True
    shown = [printable(w) for w in argv]
    return any(msg.startswith(w + ":") or msg.startswith(w + " ") for w in shown)  # "" too: ": unexpected.."


def safe_for_a_process(argv: list[str]) -> bool:
    """Only argv that parse() refuses go to a real process (so nothing starts, listens or writes),
    and only words an exec can carry (no NUL, no lone surrogate)."""
    try:
        words = [os.fsencode(w) for w in argv]
    except UnicodeEncodeError:
        return False
    return all(b"\0" not in w for w in words) and parse_outcome(argv).kind == "refused"


def run_cli_process(procs: Processes, argv: list[str], timeout: float = 30) -> str | None:
    """A real minivmm on a refused argv: status 1, one 'minivmm: ' line, no traceback. What is wrong, or None."""
    proc = procs.start(*argv, stdout=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        Processes.kill(proc)
        return f"hang: no exit in {timeout} s"
    text = err.decode(errors="replace")
    if proc.returncode != 1:
        return f"status {proc.returncode}: {text[-300:]!r}"
    if "Traceback" in text or text.count("\n") != 1 or not text.startswith("minivmm: "):
        return f"stderr is not one minivmm: line: {text[-500:]!r}"
    return None


def fuzz_cli(seconds: float, real: int, seed: int) -> int:
    findings: list[tuple[str, str]] = []
    tried: Counter[str] = Counter()
    sample: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="fuzz-cli-") as tmp:
        arena = Path(tmp)

        def body(argv: list[str]) -> None:
            out = parse_outcome(argv)
            tried[f"cli:{out.kind}"] += 1
            if out.kind in ("crash", "bad-message"):
                findings.append((repr(argv)[:300], out.detail))
            elif len(sample) < real and tried.total() % 7 == 0 and safe_for_a_process(argv):
                sample.append(argv)

        run_given(argv_lists(arena), body, 10**9, seconds, seed)
        procs = Processes(arena)
        try:
            for argv in sample:
                problem = run_cli_process(procs, argv)
                tried["cli-process:" + ("bad" if problem else "one-line")] += 1
                if problem:
                    findings.append((repr(argv)[:300], problem))
        finally:
            procs.close()
        stray = [p for p in Path(tmp).rglob("*")]
        tried["cli: files left in the arena"] = len(stray)
    return report("argv lists", tried, findings)


# --- the guest ---------------------------------------------------------------------------------------


@dataclass
class GuestRun:
    status: int | None
    log: str
    stderr: str

    def problem(self, seed: int, ops: int) -> str | None:
        want = f"portfuzz: seed={seed:016x} ops={ops} cmos=ok"
        if self.status is None:
            return f"hang; log ends {self.log[-120:]!r}"
        if want not in self.log or "portfuzz: alive" not in self.log:
            return f"status {self.status}, no report; log ends {self.log[-120:]!r}; stderr {self.stderr[-300:]!r}"
        if self.status != 33:
            return f"status {self.status}; stderr {self.stderr[-300:]!r}"
        if "internal error" in self.stderr or "Traceback" in self.stderr:
            return f"stderr: {self.stderr[-300:]!r}"
        return None


def portfuzz_args(
    seed: int, ops: int, log: Path, smp: int = 1, split: bool = False, machine: str = "pc", iommu: bool = False
) -> list[str]:
    """``split``: kernel-irqchip=split, the guest also fuzzing minivmm's own PIT and IOAPIC.
    ``machine``: the machine type (q35: the MCH's PCIEXBAR is among what 0xcf8/0xcfc reach).
    ``iommu`` (q35): -device intel-iommu, its register page among the MMIO targets."""
    return [
        "-kernel",
        guests.path("portfuzz.elf"),
        "-append",
        f"seed={seed:x} ops={ops}" + (" pit ioapic" if split else "") + (" iommu" if iommu else ""),
        "-m",
        "16",
        "-serial",
        f"file:{log}",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x4",
        "-device",
        "pvpanic",
        "-no-reboot",  # a reset would replay the same seed forever: exit instead
        *(["-smp", str(smp)] if smp > 1 else []),
        *(["-machine", "kernel-irqchip=split"] if split else []),
        *(["-machine", machine] if machine != "pc" else []),
        *(["-device", "intel-iommu"] if iommu else []),
    ]


def run_portfuzz(
    procs: Processes, seed: int, ops: int, smp: int = 1, split: bool = False, timeout: float = 60
) -> GuestRun:
    log = procs.cwd / f"portfuzz-{seed:x}.log"
    proc = procs.start(*portfuzz_args(seed, ops, log, smp, split))
    try:
        _, err = proc.communicate(timeout=timeout)
        status = proc.returncode
    except subprocess.TimeoutExpired:
        Processes.kill(proc)
        _, err = proc.communicate()
        status = None
    text = log.read_bytes().decode(errors="replace") if log.exists() else ""
    log.unlink(missing_ok=True)
    return GuestRun(status, text, err.decode(errors="replace"))


def fuzz_guest(seeds: int, ops: int, first: int) -> int:
    findings: list[tuple[str, str]] = []
    tried: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="fuzz-guest-") as tmp:
        procs = Processes(Path(tmp))
        try:
            for i in range(seeds):
                seed = (first + i) * 0x9E3779B97F4A7C15 % (1 << 64) or 1
                smp = 2 if i % 2 else 1
                split = i % 4 >= 2  # every other pair with minivmm's PIC, IOAPIC and PIT
                problem = run_portfuzz(procs, seed, ops, smp, split).problem(seed, ops)
                tried["guest:runs"] += 1
                tried["guest ops"] += ops
                if problem:
                    findings.append((f"seed={seed:x} ops={ops} smp={smp} split={split}", problem))
        finally:
            procs.close()
    return report("guest runs", tried, findings)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    q = sub.add_parser("qmp", help="every QMP command against live VMs")
    q.add_argument("--seconds", type=float, default=60)
    q.add_argument("--seed", type=int, default=1)
    c = sub.add_parser("cli", help="argv lists into minivmm.cli.parse")
    c.add_argument("--seconds", type=float, default=60)
    c.add_argument("--real", type=int, default=20, help="refused argv also run as real processes (default 20)")
    c.add_argument("--seed", type=int, default=1)
    g = sub.add_parser("guest", help="the portfuzz guest at many seeds")
    g.add_argument("--seeds", type=int, default=20)
    g.add_argument("--ops", type=int, default=100000)
    g.add_argument("--first", type=int, default=1)
    a = sub.add_parser("all", help="all three")
    a.add_argument("--seconds", type=float, default=60)
    opts = ap.parse_args(argv)
    if opts.what == "qmp":
        return fuzz_qmp(opts.seconds, opts.seed)
    if opts.what == "cli":
        return fuzz_cli(opts.seconds, opts.real, opts.seed)
    if opts.what == "guest":
        return fuzz_guest(opts.seeds, opts.ops, opts.first)
    rc = fuzz_qmp(opts.seconds, 1)
    rc |= fuzz_cli(opts.seconds, 20, 1)
    rc |= fuzz_guest(10, 100000, 1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
