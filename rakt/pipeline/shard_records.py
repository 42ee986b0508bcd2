"""Reading the samples of one WebDataset shard, tolerating a truncated or corrupt stream (counted, logged)."""
from __future__ import annotations

import collections
import gzip
import logging
import os
import re
import tarfile
import zlib
from typing import BinaryIO, Callable, Iterable, Iterator

from webdataset import tariterators

from rakt.pipeline.images import MAX_FILE_BYTES as MAX_MEMBER_BYTES
from rakt.pipeline.io import special_file

log = logging.getLogger("rakt")

META = re.compile(r"__[^/]*__($|/)")  # webdataset's meta members, never part of a sample


def shard_records(shard: str, stats: collections.Counter,
                  select_files: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """The samples of one shard (tar_members, group_samples); a broken stream ends it with a counted skip.

    Gzip shards are decompressed with `gzip` (it raises on a truncated stream, where tarfile's own stream
    mode may stop silently); a plain tar must end in its end-of-archive blocks. After a break the last
    sample may miss members: it is kept only if it has every member the shard's first sample had.
    """
    errors: list[Exception] = []
    kind = special_file(shard)
    if kind is not None:  # a FIFO named like a shard would block the reader
        stats["not_a_regular_file"] += 1
        log.warning("%s: %s, not a regular file; skipped", shard, kind)
        return

    def skip(cause: str, key: str) -> None:
        stats[cause] += 1
        log.warning("%s: sample %s skipped: %s", shard, key, cause.replace("_", " "))

    complete = has_end_marker(shard)
    held, reference, count = None, None, 0
    with (gzip.open if shard.endswith((".gz", ".tgz")) else open)(shard, "rb") as stream:
        try:
            for record in group_samples(tar_members(stream, select_files), skip):
                if held is not None:
                    yield held
                    count += 1
                if reference is None:
                    reference = {k for k in record if not k.startswith("__")}
                held = record
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            errors.append(e)
    broken = bool(errors) or not complete
    if held is not None and (not broken or (count > 0 and reference <= {k for k in held if k[:2] != "__"})):
        yield held
        count += 1
    if broken:
        why = str(errors[0]) if errors else "no end-of-archive blocks"
        stats["truncated_shard"] += 1
        log.warning("%s: truncated or corrupt shard (%s); kept the %d samples before the break",
                    shard, why or type(errors[0]).__name__, count)


def tar_members(stream: BinaryIO, select_files: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """The regular members of a tar stream as {"fname", "data"}, as webdataset reads them (its `__*__` meta files
    left out), except that a member whose header declares more than MAX_MEMBER_BYTES is read past, never held:
    its data is None (group_samples drops its sample). Stream errors propagate."""
    tar = tarfile.open(fileobj=stream, mode="r|*")
    for info in tar:
        if not info.isreg() or META.match(info.name) or (select_files is not None and not select_files(info.name)):
            continue
        data = tar.extractfile(info).read() if info.size <= MAX_MEMBER_BYTES else None
        yield {"fname": info.name, "data": data}
        tar.members = []  # stream mode would keep every header


def group_samples(files: Iterable[dict], skip: Callable[[str, str], None]) -> Iterator[dict]:
    """Tar members -> samples, as webdataset groups them (consecutive members sharing a key, suffixes lowercased),
    where one bad sample costs that sample only: a member name given twice drops its sample
    (skip("duplicate_member", key)), a member too large to read drops it ("member_too_large"), a key seen again
    after other samples drops the repeat ("duplicate_key"); webdataset stops the whole shard at a duplicate."""
    current, bad, seen = None, "", set()
    for member in files:
        if not member:  # webdataset's end-of-shard marker
            continue
        key, suffix = tariterators.base_plus_ext(member["fname"])
        if key is None:
            continue
        if current is None or key != current["__key__"]:
            if current is not None:
                yield from _finished(current, bad, skip)
            current, bad = {"__key__": key, "__url__": member.get("__url__")}, "duplicate_key" if key in seen else ""
            seen.add(key)
        suffix = suffix.lower()
        if suffix in current:
            bad = bad or "duplicate_member"
        if member["data"] is None:
            bad = bad or "member_too_large"
        current[suffix] = member["data"]
    if current is not None:
        yield from _finished(current, bad, skip)


def _finished(sample: dict, bad: str, skip: Callable[[str, str], None]) -> Iterator[dict]:
    if bad:
        skip(bad, sample["__key__"])
    else:
        yield sample


def has_end_marker(shard: str) -> bool:
    """An uncompressed tar ends in zero blocks; gzip streams check their own length."""
    if not shard.endswith(".tar"):
        return True
    size = os.path.getsize(shard)
    if size % 512 or size < 1024:
        return False
    with open(shard, "rb") as f:
        f.seek(size - 1024)
        return f.read() == bytes(1024)
