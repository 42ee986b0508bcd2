"""Reading the samples of one WebDataset shard, tolerating a truncated or corrupt stream (counted, logged)."""
from __future__ import annotations

import collections
import gzip
import logging
import os
from typing import Callable, Iterator

from webdataset import tariterators

from pipeline.io import special_file

log = logging.getLogger("rakt")


def shard_records(shard: str, stats: collections.Counter,
                  select_files: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """The samples of one shard via webdataset's tar iteration; a broken stream ends it with a counted skip.

    Gzip shards are decompressed with `gzip` (it raises on a truncated stream, where tarfile's own stream
    mode may stop silently); a plain tar must end in its end-of-archive blocks. After a break the last
    sample may miss members: it is kept only if it has every member the shard's first sample had.
    """
    errors: list[Exception] = []

    def stop(exn: Exception) -> bool:
        errors.append(exn)
        return False

    kind = special_file(shard)
    if kind is not None:  # a FIFO named like a shard would block the reader
        stats["not_a_regular_file"] += 1
        log.warning("%s: %s, not a regular file; skipped", shard, kind)
        return
    complete = has_end_marker(shard)
    held, reference, count = None, None, 0
    with (gzip.open if shard.endswith((".gz", ".tgz")) else open)(shard, "rb") as stream:
        files = tariterators.tar_file_expander([{"url": shard, "stream": stream}], handler=stop,
                                               select_files=select_files)
        for record in tariterators.group_by_keys(files, handler=stop):
            if held is not None:
                yield held
                count += 1
            if reference is None:
                reference = {k for k in record if not k.startswith("__")}
            held = record
    broken = bool(errors) or not complete
    if held is not None and (not broken or (count > 0 and reference <= {k for k in held if k[:2] != "__"})):
        yield held
        count += 1
    if broken:
        why = str(errors[0].args[0] if errors[0].args else "") if errors else "no end-of-archive blocks"
        stats["truncated_shard"] += 1
        log.warning("%s: truncated or corrupt shard (%s); kept the %d samples before the break",
                    shard, why.split(" @ ")[0] or type(errors[0]).__name__, count)


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
