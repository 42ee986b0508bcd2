"""A validation split carved from the kit's CIFAR-10 train shards, for choosing the default recipe without the test
set: N images per class that are neither in the pool (the pool holds 20,000 CIFAR-10 train images, marked by
`target_key` in their .json) nor in the main job's labelled draw (10 per class, seed 0).

    python bench/val_split.py --out runs/val                 # runs/val/val-000000.tar + classes.txt
    rakt run --set 'target.test=["runs/val/val-000000.tar"]' ...   # "test" = validation while choosing settings

Prints how many images it wrote per class. Only the experiments that chose the defaults use it (docs/results.md).
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import shutil
import tarfile
from pathlib import Path


def pool_target_keys(pool_dir: Path) -> set[str]:
    """Keys of the CIFAR-10 train images that the pool holds (from the pool's evaluation-only .json)."""
    keys: set[str] = set()
    for shard in sorted(pool_dir.glob("pool-*.tar.gz")):
        with tarfile.open(shard, "r:gz") as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    if meta.get("target_key"):
                        keys.add(meta["target_key"])
    return keys


def main(argv: list[str] | None = None) -> None:
    from rakt.pipeline.io import kit_dir
    from rakt.pipeline.sources import open_source

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(kit_dir()), help="the data kit (default: $RAKT_DATA or ../shared/data)")
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--labelled-per-class", type=int, default=10, help="the main job's few-shot draw (excluded)")
    parser.add_argument("--seed", type=int, default=0, help="the main job's draw seed")
    parser.add_argument("--out", default="runs/val")
    args = parser.parse_args(argv)

    data = Path(args.data)
    train = [str(data / "target" / "cifar10" / f"cifar10-train-{i:06d}.tar.gz") for i in range(5)]
    in_pool = pool_target_keys(data / "pool")
    labelled = open_source(train, per_class=args.labelled_per_class, seed=args.seed).keep or set()
    drawn = {key for _, key in labelled}
    source = open_source(train)
    stats: collections.Counter = collections.Counter()
    candidates = []
    for partition in source.partitions:
        for sample in source.read(partition, stats):
            if sample.id in in_pool or sample.id in drawn or sample.label is None:
                continue
            rank = hashlib.sha256(f"val:{sample.id}".encode()).hexdigest()
            candidates.append((rank, sample))
    per_class: collections.Counter = collections.Counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(data / "target" / "cifar10" / "classes.txt", out / "classes.txt")
    import webdataset as wds

    with wds.TarWriter(str(out / "val-000000.tar"), encoder=False, mtime=946684800) as sink:
        for _, sample in sorted(candidates, key=lambda c: c[0]):
            if per_class[sample.label] >= args.per_class:
                continue
            per_class[sample.label] += 1
            sink.write({"__key__": sample.id, "jpg": sample.image, "cls": str(sample.label).encode(),
                        "json": json.dumps({"split": "val", "source": "cifar10-train"}).encode()})
    print(f"pool holds {len(in_pool)} CIFAR-10 train images; labelled draw {len(drawn)}; "
          f"wrote {sum(per_class.values())} validation images to {out / 'val-000000.tar'}: "
          f"{dict(sorted(per_class.items()))}")


if __name__ == "__main__":
    main()
