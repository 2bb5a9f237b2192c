"""digestbook.py: announced digests, kept across restarts and shared between processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxychain import digestbook
from proxychain.digestbook import DigestBook


async def test_digest_book_survives_restart_and_sees_other_processes(tmp_path: Path) -> None:
    first = await digestbook.open_digest_book(tmp_path)
    assert await first.learn("/pypi/", {"/a.whl": "sha256:aa", "/b.whl?x=1": "sha256:bb"}) == 1
    assert await first.learn("/pypi/", {"/a.whl": "sha256:aa"}) == 0  # nothing new: no write
    second = await digestbook.open_digest_book(tmp_path)
    assert second.get("/pypi/", "/a.whl") == "sha256:aa"
    assert second.get("/pypi/", "/b.whl?x=1") is None  # queries never name a file
    await second.learn("/npm/", {"/x/-/x-1.tgz": "sha1:11"})
    # A torn line (a crash mid-append) is skipped, not fatal.
    with (tmp_path / digestbook.DIGEST_FILE_NAME).open("ab") as file:
        file.write(b'{"r": "/npm/", "p"\n')
    assert first.get("/npm/", "/x/-/x-1.tgz") is None
    assert await first.expected("/npm/", "/x/-/x-1.tgz") == "sha1:11"
    assert await first.expected("/npm/", "/missing") is None


async def test_digest_book_is_bounded_and_compacts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(digestbook, "COMPACT_MIN_LINES", 4)
    book = DigestBook(tmp_path / "d.jsonl", max_digests=3)
    for i in range(6):
        await book.learn("/r/", {f"/{i}": f"sha1:{i}"})
    lines = (tmp_path / "d.jsonl").read_bytes().splitlines()
    assert len(lines) == 6  # not yet above max(4, 2 * 3) lines
    await book.learn("/r/", {"/6": "sha1:6"})
    known = [book.get("/r/", f"/{i}") for i in range(7)]
    assert known == [None, None, None, None, "sha1:4", "sha1:5", "sha1:6"]
    lines = (tmp_path / "d.jsonl").read_bytes().splitlines()
    assert [json.loads(line)["p"] for line in lines] == ["/4", "/5", "/6"]
    reopened = DigestBook(tmp_path / "d.jsonl")
    await reopened.refresh()
    assert len(reopened) == 3
