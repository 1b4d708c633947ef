"""Mutations of a real saved state (tools/fuzz_stream.py): truncations, bit
flips and field-aware edits with the checksums recomputed. In-process, the
real decoders must refuse each one with StreamError/VMStateError or load a
machine whose devices work; a sample goes to real minivmm targets, which must
exit with one ``minivmm:`` line or come up answering QMP, never hang and never
print a traceback. A socket source that stalls makes the target give up."""

from __future__ import annotations

import socket
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO, MiB, Vmm, still_walking, wait_for
from minivmm.guests.abwalk import check_invariant
from minivmm.memory import RamBlock
from minivmm.migration import stream

sys.path.insert(0, str(REPO / "tools"))
import fuzz_stream as fz  # noqa: E402

FUZZ = settings(
    derandomize=True,
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Saved(tuple):
    """(stream bytes, their structure, the in-process target shape); short in failure reports."""

    def __repr__(self) -> str:
        return f"<saved state, {len(self[0])} bytes>"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A running 4 MiB walker saved to a file by a real minivmm."""
    cwd = tmp_path_factory.mktemp("fuzz-stream")
    vmm = Vmm(cwd)
    try:
        data = fz.save_state(vmm.start, cwd)
    finally:
        vmm.cleanup()
    return Saved((data, fz.parse(data), fz.Shape.of(data)))


def test_the_saved_state_loads_and_its_v1_form_too(saved):
    data, p, shape = saved
    assert fz.load_in_process(data, shape) is None
    assert fz.load_in_process(fz.to_v1(data), shape) is None
    assert len(p.pages()) >= 3 and p.records[-1].kind == stream.REC_END  # runs of non-zero RAM, <= 4 MiB each


def test_named_edits_are_refused_by_name_or_load(saved):
    _, p, shape = saved
    wrong = []
    for mut in fz.named_edits(p):
        got = fz.load_in_process(mut.data, shape)
        if (mut.expect == "load" and got is not None) or (
            mut.expect != "load" and (got is None or mut.expect not in got)
        ):
            wrong.append((mut.what, mut.expect, got))
    assert not wrong, wrong


def test_every_truncation_and_bit_flip_is_refused(saved):
    _, p, shape = saved
    import random

    rng = random.Random(7)
    muts = [*fz.truncations(p, rng, 500), *fz.bit_flips(p, rng, 500)]
    loaded = [m.what for m in muts if fz.load_in_process(m.data, shape) is None]
    assert not loaded, f"{len(loaded)} damaged streams loaded: {loaded[:5]}"


def test_damaged_files_are_refused_when_read_at_their_offsets(saved, tmp_path):
    """A file is read by worker threads, each page record at its offset: a cut or a flipped
    bit in or around any of them, whichever thread meets it, is refused."""
    data, p, shape = saved
    import random

    records = p.pages()
    assert len(records) >= 3  # the workers' path, with more than one record at a time
    assert fz.load_in_process(data, shape, tmp_path / "whole") is None
    rng = random.Random(11)
    damaged = []
    for r in records:
        for at in (r.start, r.data - 1, r.data, r.end - 1, r.end, rng.randrange(r.data, r.end)):
            damaged.append((f"cut at {at}", data[:at]))
        for at in (rng.randrange(r.start, r.data), rng.randrange(r.data, r.end), r.end - 1):
            d = bytearray(data)
            d[at] ^= 1 << rng.randrange(8)
            damaged.append((f"flip in byte {at}", bytes(d)))
    loaded = [what for what, d in damaged if fz.load_in_process(d, shape, tmp_path / "damaged") is None]
    assert not loaded, f"{len(loaded)} damaged files loaded: {loaded[:5]}"


def test_random_field_values_are_refused_or_load_validly(saved):
    _, p, shape = saved
    import random

    outcomes = {"refused": 0, "loaded": 0}
    for mut in fz.random_field_edits(p, random.Random(3), 600):
        outcomes["refused" if fz.load_in_process(mut.data, shape) else "loaded"] += 1
    assert outcomes["refused"] > 50 and outcomes["loaded"] > 50, outcomes  # both sides exercised


@given(st.data())
@FUZZ
def test_hypothesis_overwrites_anywhere_with_or_without_checksums(saved, data):
    raw, p, shape = saved
    region = data.draw(st.sampled_from(["header", "record", "state", "any"]))
    if region == "header":
        lo, hi = 0, p.header_end
    elif region == "record":
        r = data.draw(st.sampled_from(p.records))
        lo, hi = r.start, r.data or r.end
    elif region == "state":
        lo, hi = p.state.start, p.state.end
    else:
        lo, hi = 0, len(raw)
    at = data.draw(st.integers(lo, hi - 1))
    patch = data.draw(st.binary(min_size=1, max_size=16))
    mutated = bytearray(raw[:at] + patch + raw[at + len(patch) :])
    if data.draw(st.booleans()) and at >= 12 and at + len(patch) <= p.header_end - 4:  # length kept
        fz.with_header_crc(mutated)
    fz.load_in_process(bytes(mutated), shape)  # refused or valid; anything else raises


@given(st.data())
@FUZZ
def test_hypothesis_any_value_in_any_state_field(saved, data):
    _, p, shape = saved
    items = fz.sections_of(p.blob())
    sec, values = data.draw(st.sampled_from(items))
    f = data.draw(st.sampled_from(fz.SECTION_VMSDS[sec.name].fields))
    kind = f.kind if isinstance(f.kind, str) else "list"
    widths = {"u8": 8, "u16": 16, "u32": 32, "u64": 64}
    if kind in widths:
        value = data.draw(st.integers(0, (1 << widths[kind]) - 1))
    elif kind == "i64":
        value = data.draw(st.integers(-(1 << 63), (1 << 63) - 1))
    elif kind == "bool":
        value = data.draw(st.booleans())
    elif kind == "bytes":
        n = len(values[f.name])
        value = data.draw(st.binary(max_size=16) | st.integers(0, 2 * n + 8).map(bytes))
    elif kind == "str":
        value = data.draw(st.text(max_size=40) | st.sampled_from(sorted(fz.machine_state.RESUMABLE)))
    else:
        value = values[f.name] * data.draw(st.integers(0, 300))
    fz.load_in_process(fz.edit_field(p, sec.name, f.name, value, sec.instance), shape)


# --- real targets ---------------------------------------------------------------------------------


def _sample(p):
    import random

    rng = random.Random(11)
    named = {m.what: m for m in fz.named_edits(p)}
    picks = [
        "rtc index 200",
        "rtc index 100",
        "i8042 32 MiB queue",
        "fpu 100 bytes",
        "xsave 100 bytes",
        "runstate unknown",
        "runstate paused",
        "runstate invalid UTF-8",
        "duplicate section",
        "unknown MSR",
        "page offset flipped",
        "page offset outside, crc redone",
        "page record lost",
        "short header",
        "version 1",
    ]
    out = [named[w] for w in picks]
    out += list(fz.truncations(p, rng, 3)) + list(fz.bit_flips(p, rng, 3)) + list(fz.random_field_edits(p, rng, 2))
    return out


def test_real_targets_refuse_with_one_line_or_come_up(saved, vmm, tmp_path):
    data, p, shape = saved
    start = time.monotonic()
    bad = []
    sample = _sample(p)
    for i, mut in enumerate(sample):
        path = tmp_path / f"m{i}.state"
        path.write_bytes(mut.data)
        v = fz.judge(vmm.start, fz.guest_args(), path, tmp_path / f"q{i}.qmp", timeout=30)
        path.unlink()
        in_process = fz.load_in_process(mut.data, shape)
        prefix = f"minivmm: file:{path}: load of migration failed: "
        if v.kind == "refused":
            ok = v.detail.startswith(prefix) and in_process is not None and in_process in v.detail
            ok = ok and (not mut.expect or mut.expect in v.detail)
        elif v.kind == "loaded":
            ok = in_process is None and v.detail in fz.machine_state.RESUMABLE and mut.expect in ("", "load")
        else:
            ok = False
        if not ok:
            bad.append((mut.category, mut.what, v, in_process))
    assert not bad, bad
    assert time.monotonic() - start < 60, "the real sample must stay quick"


def test_real_target_of_the_v1_stream_runs_the_walker_on(saved, qmp_vm, ram_fds, tmp_path):
    data, _, _ = saved
    path = tmp_path / "v1.state"
    path.write_bytes(fz.to_v1(data))
    dst = qmp_vm(*fz.guest_args(), "-incoming", f"file:{path}")
    wait_for(lambda: dst.status() == "running", what="the target to resume")
    fd = ram_fds(dst.proc.pid)
    still_walking(fd, 2)
    dst.cmd("stop")
    check_invariant(fd, fz.RAM_MIB * MiB)


@pytest.mark.parametrize("cut", ["nothing", "mid-page"])
def test_a_stalled_socket_source_times_out(saved, vmm, tmp_path, cut):
    data, p, _ = saved
    sock = tmp_path / "mig.sock"
    proc = vmm.start(*fz.guest_args(), "-incoming", f"unix:{sock}", env={stream.TIMEOUT_ENV: "1"})
    wait_for(lambda: sock.exists() or proc.poll() is not None, what="the incoming socket")
    sender = socket.socket(socket.AF_UNIX)
    sender.connect(str(sock))
    try:
        sent = 0 if cut == "nothing" else p.pages()[1].data + 1000
        sender.sendall(data[:sent])
        began = time.monotonic()
        status = proc.wait(20)
        waited = time.monotonic() - began
    finally:
        sender.close()
    err = proc.stderr.read().decode()
    assert status == 1, err
    where = "the header" if cut == "nothing" else "'pc.ram' at"
    assert err.count("\n") == 1 and err.startswith(f"minivmm: unix:{sock}: load of migration failed: "), err
    assert f"migration stream stalled: nothing received for 1 s while reading {where}" in err, err
    assert 0.9 < waited < 10, waited


def test_stream_timeout_setting_is_checked(monkeypatch):
    monkeypatch.setenv(stream.TIMEOUT_ENV, "2.5")
    assert stream.timeout() == 2.5
    monkeypatch.delenv(stream.TIMEOUT_ENV)
    assert stream.timeout() == stream.DEFAULT_TIMEOUT == 30
    for bad in ("0", "-1", "soon", "inf"):
        monkeypatch.setenv(stream.TIMEOUT_ENV, bad)
        with pytest.raises(stream.StreamError, match=f"^{stream.TIMEOUT_ENV}={bad}: expected a number of seconds"):
            stream.timeout()


def test_fuzz_cli_runs_and_finds_nothing():
    """The longer harness, briefly: a real save, in-process mutations, two real loads."""
    rc = fz.main(["--seconds", "3", "--real", "2"])
    assert rc == 0


def test_a_file_read_by_workers_keeps_the_later_copy_of_a_page(tmp_path):
    """A stream may carry a page twice (a precopy pass, then the final one): read from a file by
    worker threads, the later copy still wins, even when the earlier one is the larger, slower read."""
    size = 8 << 20
    path = tmp_path / "twice.stream"
    first, later = bytes([1]) * (4 << 20), bytes([2]) * 4096
    with open(path, "wb", buffering=0) as f:
        w = stream.Writer(f)
        w.header([stream.BlockInfo("pc.ram", size, True)], [stream.Placement(0, size, 0, 0)])
        for _ in range(8):
            w.pages(0, 0, memoryview(first))
            w.pages(0, 4096, memoryview(later))
        w.end()
        w.close()
    block = RamBlock("pc.ram", size, -1, False, "ram", mem=bytearray(size))
    with open(path, "rb", buffering=0) as f:
        r = stream.Reader(f)
        r.header()
        while (kind := r.next_record()) == stream.REC_PAGES:
            r.pages_into([block])
        assert kind == stream.REC_END
        r.end()
        r.close()
    assert block.mem[4096:8192] == later and block.mem[:4096] == first[:4096]
