"""Disk tier: metadata encoding, fills, crash leftovers, corruption and the byte budget.

These run on the real clock: worker threads and MockClock's autojump do not mix, and nothing
here waits on time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from proxychain import disk as disk_module
from proxychain import diskfiles, diskindex, diskmeta, diskscan, diskwriter
from proxychain.disk import (
    DiskStatistics,
    DiskTier,
    LoadedLookup,
    check_key,
    decode_meta,
    encode_meta,
    open_disk_tier,
)
from proxychain.entry import Entry
from proxychain.errors import CacheCorrupt
from proxychain.http import Headers

MiB = 1 << 20


def hexkey(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


KEY = hexkey("GET /a")
VARIANT = hexkey("accept-encoding: gzip")
SHA_ABC = hashlib.sha256(b"abc").hexdigest()


def make_entry(key: str = KEY, variant: str = "", url: str = "/a", **kw: Any) -> Entry:
    headers = Headers([("Content-Type", "text/plain"), ("X-B", "2"), ("x-a", "1"), ("X-B", "3")])
    return Entry(key=key, variant=variant, url=url, headers=headers, **kw)


async def fill(
    tier: DiskTier, key: str = KEY, body: bytes = b"hello world", variant: str = "", **kw: Any
) -> Entry:
    writer = await tier.open_writer(key, variant)
    for start in range(0, len(body), 4):
        await writer.write(body[start : start + 4])
    return await writer.commit(make_entry(key, variant, **kw), expected_size=len(body))


async def read_all(tier: DiskTier, entry: Entry, chunk_size: int = MiB) -> list[bytes]:
    return [chunk async for chunk in tier.read(entry, chunk_size=chunk_size)]


def files(root: Path, sub: str) -> list[str]:
    base = root / sub
    return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())


@pytest.fixture
async def tier(tmp_path: Path) -> AsyncIterator[DiskTier]:
    async with open_disk_tier(tmp_path, max_bytes=MiB, rescan_interval=None) as opened:
        await opened.wait_index_ready()
        yield opened


# ---- pure parts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "variant", "ok"),
    [
        (KEY, "", True),
        (KEY, VARIANT, True),
        ("ab", "", True),
        ("a", "", False),  # too short to shard
        (KEY.upper(), "", False),
        ("../../etc/passwd", "", False),
        ("ab/cd", "", False),
        ("", "", False),
        ("f" * 129, "", False),
        (KEY, "_", False),
        (KEY, "..", False),
        (KEY, VARIANT.upper(), False),
        (KEY + "\n", "", False),
    ],
)
def test_check_key(key: str, variant: str, ok: bool) -> None:
    if ok:
        check_key(key, variant)
    else:
        with pytest.raises(ValueError):
            check_key(key, variant)


def test_meta_round_trip_keeps_header_order() -> None:
    entry = make_entry(
        variant=VARIANT,
        status=203,
        reason="Non-Authoritative",
        vary={"accept-encoding": "gzip", "accept": "\x00"},
        request_time=1_700_000_000.25,
        response_time=1_700_000_001,
        body_size=3,
        sha256=SHA_ABC,
        verified="sha256:abc",
    )
    decoded = decode_meta(encode_meta(entry))
    assert decoded == entry
    assert list(decoded.headers) == [
        ("content-type", "text/plain"),
        ("x-b", "2"),
        ("x-a", "1"),
        ("x-b", "3"),
    ]
    assert isinstance(decoded.response_time, float)


GOOD = json.loads(encode_meta(make_entry(body_size=3, sha256=SHA_ABC)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"v": 2}, "unsupported version"),
        ({"extra": 1}, "fields differ"),
        ({"key": "../x"}, "lower-case hex"),
        ({"variant": "_"}, "lower-case hex"),
        ({"status": 42}, "out of range"),
        ({"status": True}, "'status' is not int"),
        ({"body_size": -1}, "out of range"),
        ({"body_size": 1.5}, "'body_size' is not int"),
        ({"sha256": "abc"}, "not a hex digest"),
        ({"headers": [["a"]]}, "name/value pairs"),
        ({"headers": {"a": "b"}}, "'headers' is not list"),
        ({"vary": {"a": 1}}, "string map"),
        ({"url": None}, "'url' is not str"),
        ({"request_time": "now"}, "'request_time' is not float"),
    ],
)
def test_decode_meta_rejects(change: dict[str, Any], message: str) -> None:
    doc = {**GOOD, **change}
    with pytest.raises(CacheCorrupt, match=message):
        decode_meta(json.dumps(doc).encode())


@pytest.mark.parametrize(
    "data", [b"", b"not json", b"[1]", b'{"v":1,"response_time":NaN}', b"\xff\xfe"]
)
def test_decode_meta_rejects_garbage(data: bytes) -> None:
    with pytest.raises(CacheCorrupt):
        decode_meta(data)


# ---- fills -----------------------------------------------------------------------------------


async def test_round_trip(tier: DiskTier, tmp_path: Path) -> None:
    body = b"hello world"
    entry = await fill(tier, body=body)
    assert entry.body_size == 11
    assert entry.sha256 == hashlib.sha256(body).hexdigest()
    assert await tier.lookup(KEY) == [entry]
    assert await read_all(tier, entry, chunk_size=4) == [b"hell", b"o wo", b"rld"]
    assert await tier.verify(entry)
    assert files(tmp_path, "objects") == [
        f"{KEY[:2]}/{KEY}/_.{entry.sha256}.body",
        f"{KEY[:2]}/{KEY}/_.meta",
    ]
    assert files(tmp_path, "tmp") == []
    meta_size = len(encode_meta(entry))
    assert tier.statistics() == DiskStatistics(
        bytes=11 + meta_size,
        entries=1,
        max_bytes=MiB,
        evictions=0,
        index_ready=True,
        corrupt_dropped=0,
        open_writers=0,
    )


async def test_empty_body_and_variants(tier: DiskTier) -> None:
    plain = await fill(tier, body=b"", response_time=1.0)
    varied = await fill(tier, body=b"gz", variant=VARIANT, response_time=2.0)
    assert await read_all(tier, plain) == []
    assert await tier.lookup(KEY) == [varied, plain]  # newest response first
    assert await tier.lookup(hexkey("other")) == []


async def test_small_bodies_come_with_their_entries_in_one_worker_thread_call(
    tier: DiskTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = await fill(tier, body=b"plain", response_time=1.0)
    varied = await fill(tier, body=b"gzipped", variant=VARIANT, response_time=2.0)
    calls: list[str] = []
    real_run = tier._run

    async def counted(fn: Any, *args: Any) -> Any:
        calls.append(fn.__name__)
        return await real_run(fn, *args)

    monkeypatch.setattr(tier, "_run", counted)
    found = await tier.lookup_loaded(KEY, load_max=7)
    assert found == LoadedLookup([varied, plain], [b"gzipped", b"plain"], 0)
    assert calls == ["_read_key_dir_loaded"]
    # One body over the bound: entries only, the bodies are left to stream.
    assert await tier.lookup_loaded(KEY, load_max=6) == LoadedLookup([varied, plain], None, 0)
    assert await tier.lookup_loaded(hexkey("other"), load_max=7) == LoadedLookup([], None, 0)


async def test_a_body_failing_its_check_is_dropped_by_a_loaded_lookup(
    tier: DiskTier, tmp_path: Path
) -> None:
    good = await fill(tier, body=b"good", variant=VARIANT, response_time=2.0)
    bad = await fill(tier, body=b"abcd", response_time=1.0)
    (tmp_path / "objects" / KEY[:2] / KEY / f"_.{bad.sha256}.body").write_bytes(b"abce")
    assert await tier.lookup_loaded(KEY, load_max=MiB) == LoadedLookup([good], [b"good"], 1)
    assert tier.statistics().corrupt_dropped == 1
    assert await tier.lookup(KEY) == [good]


async def _store(tier: DiskTier, key: str, variant: str, body: bytes) -> Entry:
    writer = await tier.open_writer(key, variant)
    await writer.write(body)
    return await writer.commit(make_entry(key, variant, vary={"accept-encoding": "gzip"}))


@pytest.mark.parametrize("exclusive", [True, False])
async def test_a_key_the_whole_index_lacks_is_a_miss_without_a_disk_read_when_exclusive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exclusive: bool
) -> None:
    reads: list[str] = []
    real = diskscan._read_key_dir

    def counting(key_dir: Path, key: str) -> Any:
        reads.append(key)
        return real(key_dir, key)

    monkeypatch.setattr(disk_module, "_read_key_dir", counting)  # where DiskTier.lookup finds it
    other = hexkey("other")
    async with open_disk_tier(
        tmp_path, max_bytes=MiB, rescan_interval=None, exclusive=exclusive
    ) as tier:
        await tier.wait_index_ready()
        varied = await _store(tier, KEY, VARIANT, b"gzipped")
        assert await tier.lookup(other) == []
        assert await tier.lookup(KEY) == [varied]  # indexed under a Vary variant only
        await tier.remove(KEY)
        assert await tier.lookup(KEY) == []
    # Exclusive: only the lookup of an indexed key read the disk.
    assert reads == ([KEY] if exclusive else [other, KEY, KEY])


async def test_the_next_writers_temp_file_is_made_ahead_and_removed_on_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    created: list[Path] = []
    real_create = diskfiles._create
    real_make = DiskTier._make_spare_now
    made: list[trio.Event] = [trio.Event()]

    def counting(path: Path) -> Any:
        created.append(path)
        return real_create(path)

    async def announcing(self: DiskTier) -> None:
        await real_make(self)
        made[-1].set()
        made.append(trio.Event())

    monkeypatch.setattr(disk_module, "_create", counting)  # where DiskTier finds it
    monkeypatch.setattr(DiskTier, "_make_spare_now", announcing)
    async with open_disk_tier(
        tmp_path, max_bytes=MiB, rescan_interval=None, create_ahead=True
    ) as tier:
        first = await tier.open_writer(KEY, "")
        assert created == [first.tmp_path]  # nothing made ahead yet: made here
        await made[0].wait()  # ... and the next one in the background
        spare = tier.spare_path
        assert spare is not None
        assert created == [first.tmp_path, spare]
        await first.abort()
        second = await tier.open_writer(hexkey("second"), "")
        assert second.tmp_path == spare  # taken, not made
        await second.write(b"body")
        entry = await second.commit(make_entry(hexkey("second")))
        assert b"".join(await read_all(tier, entry)) == b"body"
        await made[1].wait()
        assert len(created) == 3
        assert files(tmp_path, "tmp") == [created[2].name]
    assert files(tmp_path, "tmp") == []


async def test_tmp_path_is_readable_while_written(tier: DiskTier) -> None:
    writer = await tier.open_writer(KEY, "")
    await writer.write(b"part one ")
    assert writer.tmp_path.read_bytes() == b"part one "
    assert writer.bytes_written == 9
    assert tier.statistics().open_writers == 1
    await writer.abort()


async def test_a_reader_of_the_temp_file_keeps_reading_after_the_commit_renamed_it(
    tier: DiskTier, tmp_path: Path
) -> None:
    writer = await tier.open_writer(KEY, "")
    await writer.write(b"first ")
    reader = writer.open_reader()
    try:
        assert os.pread(reader.fileno(), 64, 0) == b"first "
        await writer.write(b"second")
        entry = await writer.commit(make_entry())
        assert files(tmp_path, "tmp") == []  # renamed into place
        assert os.pread(reader.fileno(), 64, 0) == b"first second"
    finally:
        reader.close()
    assert b"".join(await read_all(tier, entry)) == b"first second"
    with pytest.raises(trio.ClosedResourceError):
        writer.open_reader()


async def test_writes_in_a_burst_are_gathered_until_a_batch_or_the_commit(
    tier: DiskTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(diskwriter, "WRITE_BATCH_INTERVAL", 3600.0)
    monkeypatch.setattr(diskwriter, "WRITE_BATCH_BYTES", 10)
    writer = await tier.open_writer(KEY, "", batched=True)
    seen: list[tuple[int, bytes]] = []
    for chunk in (b"abcd", b"efgh", b"ijkl", b"mn"):
        await writer.write(chunk)
        seen.append((writer.bytes_written, writer.tmp_path.read_bytes()))
    entry = await writer.commit(make_entry(), expected_size=14)
    assert seen == [(0, b""), (0, b""), (12, b"abcdefghijkl"), (12, b"abcdefghijkl")]
    assert (entry.body_size, entry.sha256) == (14, hashlib.sha256(b"abcdefghijklmn").hexdigest())
    assert b"".join(await read_all(tier, entry)) == b"abcdefghijklmn"


async def test_a_write_after_a_pause_goes_at_once(
    tier: DiskTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(diskwriter, "WRITE_BATCH_INTERVAL", 0.0)
    writer = await tier.open_writer(KEY, "", batched=True)
    await writer.write(b"slow")
    assert (writer.bytes_written, writer.tmp_path.read_bytes()) == (4, b"slow")
    await writer.abort()


async def test_commit_with_a_short_last_batch_publishes_nothing(
    tier: DiskTier, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(diskwriter, "WRITE_BATCH_INTERVAL", 3600.0)
    writer = await tier.open_writer(KEY, "", batched=True)
    await writer.write(b"abc")
    with pytest.raises(CacheCorrupt, match="body is 3 bytes, upstream promised 4"):
        await writer.commit(make_entry(), expected_size=4)
    assert files(tmp_path, "tmp") == []
    assert files(tmp_path, "objects") == []


async def test_abort_leaves_no_files(tier: DiskTier, tmp_path: Path) -> None:
    writer = await tier.open_writer(KEY, "")
    await writer.write(b"partial")
    await writer.abort()
    await writer.abort()  # idempotent
    assert files(tmp_path, "tmp") == []
    assert files(tmp_path, "objects") == []
    assert tier.statistics().open_writers == 0
    with pytest.raises(trio.ClosedResourceError):
        await writer.write(b"more")
    with pytest.raises(trio.ClosedResourceError):
        await writer.commit(make_entry())


async def test_abort_runs_when_cancelled(tier: DiskTier, tmp_path: Path) -> None:
    with trio.CancelScope() as scope:
        async with await tier.open_writer(KEY, "") as writer:
            await writer.write(b"partial")
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert files(tmp_path, "tmp") == []


@pytest.mark.parametrize("expected", [10, 12, 0])
async def test_expected_size_mismatch_never_commits(
    tier: DiskTier, tmp_path: Path, expected: int
) -> None:
    writer = await tier.open_writer(KEY, "")
    await writer.write(b"hello world")
    with pytest.raises(CacheCorrupt, match=f"upstream promised {expected}"):
        await writer.commit(make_entry(), expected_size=expected)
    assert await tier.lookup(KEY) == []
    assert files(tmp_path, "tmp") == []
    assert files(tmp_path, "objects") == []


async def test_commit_rejects_foreign_entry(tier: DiskTier) -> None:
    async with await tier.open_writer(KEY, "") as writer:
        with pytest.raises(ValueError):
            await writer.commit(make_entry(key=hexkey("other")))


async def test_replacement_removes_old_body(tier: DiskTier, tmp_path: Path) -> None:
    await fill(tier, body=b"old body")
    new = await fill(tier, body=b"new body!")
    assert await tier.lookup(KEY) == [new]
    assert files(tmp_path, "objects") == [
        f"{KEY[:2]}/{KEY}/_.{new.sha256}.body",
        f"{KEY[:2]}/{KEY}/_.meta",
    ]
    assert tier.statistics().entries == 1


async def test_update_meta(tier: DiskTier) -> None:
    entry = await fill(tier)
    fresher = entry.replace(response_time=99.0, headers=entry.headers.set("etag", '"x"'))
    await tier.update_meta(fresher)
    assert await tier.lookup(KEY) == [fresher]
    assert await read_all(tier, fresher) == [b"hello world"]
    await tier.remove(KEY)
    await tier.update_meta(fresher)  # the body is gone: nothing is resurrected
    assert await tier.lookup(KEY) == []


@pytest.mark.parametrize(
    "bad", ["../x", "AB", "a", "ab/../cd"], ids=["dotdot", "upper", "short", "slash"]
)
async def test_invalid_keys_rejected(tier: DiskTier, bad: str) -> None:
    with pytest.raises(ValueError):
        await tier.lookup(bad)
    with pytest.raises(ValueError):
        await tier.open_writer(bad, "")
    with pytest.raises(ValueError):
        await tier.open_writer(KEY, bad)
    with pytest.raises(ValueError):
        await tier.remove(bad)
    assert tier.statistics().open_writers == 0


# ---- restart and crash leftovers -------------------------------------------------------------


async def test_restart_finds_entries(tmp_path: Path) -> None:
    async with open_disk_tier(tmp_path, max_bytes=MiB, rescan_interval=None) as first:
        entry = await fill(first)
        size = first.statistics().bytes
    async with open_disk_tier(tmp_path, max_bytes=MiB, rescan_interval=None) as second:
        assert await second.lookup(KEY) == [entry]  # straight to the file, scan or not
        assert await read_all(second, entry) == [b"hello world"]
        await second.wait_index_ready()
        stats = second.statistics()
        assert (stats.bytes, stats.entries, stats.index_ready) == (size, 1, True)


async def test_exit_aborts_open_writers(tmp_path: Path) -> None:
    async with open_disk_tier(tmp_path, max_bytes=MiB, rescan_interval=None) as tier:
        writer = await tier.open_writer(KEY, "")
        await writer.write(b"unfinished")
        assert files(tmp_path, "tmp") != []
    assert files(tmp_path, "tmp") == []


def dead_pid() -> int:
    return (1 << 22) + 1  # above Linux's PID_MAX_LIMIT: never a live process


async def test_leftover_tmp_files_cleaned_on_open(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    live = f"{os.getppid()}-abcd-1.part"  # another live process's fill in progress
    for name in ["junk", f"{dead_pid()}-abcd-7.part", f"{dead_pid()}-abcd-8.meta.part", live]:
        (tmp / name).write_bytes(b"x")
    (tmp / f"{os.getpid()}-0bad-1.part").write_bytes(b"x")  # an earlier tier in this process
    old_live = tmp / f"{os.getppid()}-abcd-2.part"
    old_live.write_bytes(b"x")
    os.utime(old_live, (1_000_000, 1_000_000))  # live pid, but days old: stale anyway
    async with open_disk_tier(tmp_path, max_bytes=MiB, rescan_interval=None):
        assert files(tmp_path, "tmp") == [live]


def key_dir(root: Path, key: str = KEY) -> Path:
    return root / "objects" / key[:2] / key


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("meta_garbage", "metadata is not JSON: "),
        ("meta_other_key", "metadata names another entry"),
        ("body_missing", "body file is missing"),
        ("body_short", "body is 5 bytes, metadata says 11"),
    ],
)
async def test_corrupt_entry_dropped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str, reason: str
) -> None:
    async with open_disk_tier(tmp_path, max_bytes=MiB, rescan_interval=None) as tier:
        entry = await fill(tier)
    kd = key_dir(tmp_path)
    meta, body = kd / "_.meta", kd / f"_.{entry.sha256}.body"
    if damage == "meta_garbage":
        meta.write_bytes(b"{truncated")
    elif damage == "meta_other_key":
        meta.write_bytes(encode_meta(entry.replace(key=hexkey("elsewhere"))))
    elif damage == "body_missing":
        body.unlink()
    else:
        body.write_bytes(b"hello")
    caplog.set_level(logging.WARNING, logger="proxychain.disk")
    async with open_disk_tier(tmp_path, max_bytes=MiB, rescan_interval=None) as tier:
        assert await tier.lookup(KEY) == []  # the lookup or the background scan drops it
        await tier.wait_index_ready()
        assert tier.statistics().corrupt_dropped == 1
        assert not meta.exists()
    [message] = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
    assert message.startswith(f"dropped corrupt cache entry {meta}: {reason}")


async def test_scan_drops_corrupt_and_old_orphans(tmp_path: Path) -> None:
    async with open_disk_tier(tmp_path, max_bytes=MiB, rescan_interval=None) as tier:
        good = await fill(tier, key=hexkey("good"))
        await fill(tier, key=hexkey("bad"))
    (key_dir(tmp_path, hexkey("bad")) / "_.meta").write_bytes(b"")
    old_orphan = key_dir(tmp_path, hexkey("good")) / f"{VARIANT}.{'0' * 64}.body"
    new_orphan = key_dir(tmp_path, hexkey("good")) / f"{VARIANT}.{'1' * 64}.body"
    old_orphan.write_bytes(b"left by a crash")
    new_orphan.write_bytes(b"a commit landing")
    os.utime(old_orphan, (1_000_000, 1_000_000))
    async with open_disk_tier(tmp_path, max_bytes=MiB, rescan_interval=None) as tier:
        await tier.wait_index_ready()
        stats = tier.statistics()
        assert (stats.entries, stats.corrupt_dropped) == (1, 1)
        assert [e async for e in tier.iter_entries()] == [good]
    assert not old_orphan.exists()
    assert new_orphan.exists()


async def test_read_of_truncated_body_raises_and_drops(tier: DiskTier, tmp_path: Path) -> None:
    entry = await fill(tier)
    (key_dir(tmp_path) / f"_.{entry.sha256}.body").write_bytes(b"hello")
    with pytest.raises(CacheCorrupt, match="body is 5 bytes, metadata says 11"):
        await read_all(tier, entry)
    assert files(tmp_path, "objects") == []
    assert tier.statistics().corrupt_dropped == 1


async def test_verify_detects_tampering(tier: DiskTier, tmp_path: Path) -> None:
    entry = await fill(tier)
    (key_dir(tmp_path) / f"_.{entry.sha256}.body").write_bytes(b"HELLO WORLD")
    assert not await tier.verify(entry)
    (key_dir(tmp_path) / f"_.{entry.sha256}.body").unlink()
    assert not await tier.verify(entry)


async def test_load_checks_sha256(tier: DiskTier, tmp_path: Path) -> None:
    entry = await fill(tier)
    assert await tier.load(entry) == b"hello world"
    (key_dir(tmp_path) / f"_.{entry.sha256}.body").write_bytes(b"HELLO WORLD")
    with pytest.raises(CacheCorrupt, match="sha256"):
        await tier.load(entry)
    assert await tier.lookup(KEY) == []


# ---- removal ---------------------------------------------------------------------------------


async def test_remove_and_remove_where(tier: DiskTier, tmp_path: Path) -> None:
    await fill(tier, key=hexkey("1"), url="/go/a")
    await fill(tier, key=hexkey("1"), variant=VARIANT, url="/go/a")
    await fill(tier, key=hexkey("2"), url="/go/b")
    await fill(tier, key=hexkey("3"), url="/pypi/c")
    await fill(tier, key=hexkey("4"), url="/pypi/d")
    assert await tier.remove(hexkey("1"), VARIANT) == 1
    assert await tier.remove(hexkey("1"), VARIANT) == 0
    assert await tier.remove_where(lambda e: e.url.startswith("/go/")) == 2
    assert await tier.remove(hexkey("4")) == 1
    assert [e.url async for e in tier.iter_entries()] == ["/pypi/c"]
    assert tier.statistics().entries == 1
    assert len(files(tmp_path, "objects")) == 2


# ---- the byte budget -------------------------------------------------------------------------


async def test_budget_evicts_least_recently_used(tmp_path: Path) -> None:
    body = b"x" * 1000
    size = len(encode_meta(make_entry(body_size=1000, sha256=SHA_ABC))) + len(body)
    async with open_disk_tier(tmp_path, max_bytes=3 * size + size // 2) as tier:
        await tier.wait_index_ready()
        a, b, c = [await fill(tier, key=hexkey(n), body=body) for n in "abc"]
        assert tier.statistics().bytes == 3 * size
        tier.touch(a)  # a is now the most recently used; b the least
        await fill(tier, key=hexkey("d"), body=body)
        assert await tier.lookup(b.key) == []
        assert [len(await tier.lookup(e.key)) for e in (a, c)] == [1, 1]
        await fill(tier, key=hexkey("e"), body=body)
        assert await tier.lookup(c.key) == []
        stats = tier.statistics()
        assert (stats.evictions, stats.entries, stats.bytes) == (2, 3, 3 * size)


async def test_restart_evicts_oldest_by_metadata_mtime(tmp_path: Path) -> None:
    body = b"x" * 1000
    async with open_disk_tier(tmp_path, max_bytes=MiB, rescan_interval=None) as tier:
        entries = [await fill(tier, key=hexkey(n), body=body) for n in "abcd"]
        size = tier.statistics().bytes // 4
    for age, entry in zip([30, 10, 40, 20], entries, strict=True):  # b is the oldest, then d
        when = 1_700_000_000 + age
        os.utime(key_dir(tmp_path, entry.key) / "_.meta", (when, when))
    async with open_disk_tier(tmp_path, max_bytes=2 * size, rescan_interval=None) as tier:
        await tier.wait_index_ready()
        kept = [bool(await tier.lookup(e.key)) for e in entries]
        assert kept == [True, False, True, False]
        assert tier.statistics().evictions == 2


async def test_rescan_picks_up_other_processes(tmp_path: Path) -> None:
    async with (
        open_disk_tier(tmp_path, max_bytes=MiB, rescan_interval=0.01) as mine,
        open_disk_tier(tmp_path, max_bytes=MiB, rescan_interval=None) as theirs,
    ):
        await mine.wait_index_ready()
        entry = await fill(theirs)
        with trio.fail_after(5):
            while mine.statistics().entries != 1:
                await trio.sleep(0.01)
        await theirs.remove(entry.key)
        with trio.fail_after(5):
            while mine.statistics().entries != 0:
                await trio.sleep(0.01)


@pytest.mark.parametrize(
    "bad",
    [
        make_entry(sha256="../../x"),
        make_entry(sha256=""),
        make_entry(key="../x", sha256=SHA_ABC),
        make_entry(variant="..", sha256=SHA_ABC),
    ],
    ids=["sha-path", "sha-empty", "key", "variant"],
)
async def test_entries_naming_bad_paths_rejected(tier: DiskTier, bad: Entry) -> None:
    with pytest.raises(ValueError):
        encode_meta(bad)
    with pytest.raises(ValueError):
        await tier.update_meta(bad)
    with pytest.raises(ValueError):
        await tier.load(bad)
    with pytest.raises(ValueError):
        await tier.verify(bad)
    with pytest.raises(ValueError):
        await read_all(tier, bad)


# ---- the index scan --------------------------------------------------------------------------


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    decoded: list[bytes] = []
    real = diskmeta.decode_meta

    def counting(data: bytes) -> Entry:
        decoded.append(data)
        return real(data)

    # Each module whose blocking helpers decode metadata looks it up in its own namespace.
    for module in (diskscan, diskfiles):
        monkeypatch.setattr(module, "decode_meta", counting)
    return decoded


async def test_scan_of_sound_entries_reads_no_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_disk_tier(tmp_path, max_bytes=MiB, rescan_interval=None) as tier:
        await fill(tier, key=hexkey("a"), body=b"a" * 100)
        await fill(tier, key=hexkey("a"), variant=VARIANT, body=b"gz")
        await fill(tier, key=hexkey("b"), body=b"")
        size = tier.statistics().bytes
    decoded = count_decodes(monkeypatch)
    async with open_disk_tier(tmp_path, max_bytes=MiB, rescan_interval=None) as tier:
        await tier.wait_index_ready()
        stats = tier.statistics()
        assert (stats.bytes, stats.entries, stats.corrupt_dropped) == (size, 3, 0)
    assert decoded == []


async def test_scan_reads_metadata_where_a_variant_has_two_bodies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_disk_tier(tmp_path, max_bytes=MiB, rescan_interval=None) as tier:
        entry = await fill(tier)
        size = tier.statistics().bytes
    # A crash between a replacing commit's renames and the old body's removal, and a commit
    # landing now: the metadata says which body is the entry's.
    old_orphan = key_dir(tmp_path) / f"_.{'0' * 64}.body"
    new_orphan = key_dir(tmp_path) / f"_.{'1' * 64}.body"
    old_orphan.write_bytes(b"replaced long ago")
    new_orphan.write_bytes(b"landing")
    os.utime(old_orphan, (1_000_000, 1_000_000))
    decoded = count_decodes(monkeypatch)
    async with open_disk_tier(tmp_path, max_bytes=MiB, rescan_interval=None) as tier:
        await tier.wait_index_ready()
        stats = tier.statistics()
        assert (stats.bytes, stats.entries, stats.corrupt_dropped) == (size, 1, 0)
        assert len(decoded) == 1
        assert await tier.lookup(KEY) == [entry]
    assert not old_orphan.exists()
    assert new_orphan.exists()


@pytest.mark.parametrize("batch", [1, 2, 1000])
async def test_scan_in_small_batches_evicts_oldest_by_metadata_mtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    monkeypatch.setattr(disk_module, "SCAN_BATCH_KEYS", batch)
    monkeypatch.setattr(diskindex, "SCAN_MERGE_BATCH", batch)
    body = b"x" * 1000
    # Three keys share a prefix directory (scanned over several batches), three do not.
    keys = [f"ab{hexkey(n)[2:]}" for n in "abc"] + [hexkey(n) for n in "def"]
    async with open_disk_tier(tmp_path, max_bytes=MiB, rescan_interval=None) as tier:
        entries = [await fill(tier, key=k, body=body) for k in keys]
        size = tier.statistics().bytes // 6
    ages = [30, 10, 60, 20, 50, 40]  # oldest first: b, d, a
    for age, entry in zip(ages, entries, strict=True):
        when = 1_700_000_000 + age
        os.utime(key_dir(tmp_path, entry.key) / "_.meta", (when, when))
    async with open_disk_tier(tmp_path, max_bytes=3 * size, rescan_interval=None) as tier:
        await tier.wait_index_ready()
        kept = [bool(await tier.lookup(e.key)) for e in entries]
        assert kept == [False, False, True, False, True, True]
        assert tier.statistics().evictions == 3


async def test_rescan_keeps_what_is_still_on_disk(tmp_path: Path) -> None:
    async with open_disk_tier(tmp_path, max_bytes=MiB, rescan_interval=None) as tier:
        await tier.wait_index_ready()
        a = await fill(tier, key=hexkey("a"))
        b = await fill(tier, key=hexkey("b"))
        size = tier.statistics().bytes // 2
        for _ in range(2):
            await tier._scan()
            assert (tier.statistics().entries, tier.statistics().bytes) == (2, 2 * size)
        for path in key_dir(tmp_path, b.key).iterdir():  # another process removes b
            path.unlink()
        await tier._scan()
        assert (tier.statistics().entries, tier.statistics().bytes) == (1, size)
        assert await tier.lookup(a.key) == [a]
