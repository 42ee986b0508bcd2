"""img2dataset in a process of its own, whose workers die with `rakt download`.

`rakt download` starts this module (`python -m rakt.pipeline.download.driver ARGS.json`) in a new session, so that the
driver and every process img2dataset starts (its pool workers, its stats logger) share one process group, and
keeps the write end of the driver's stdin. When rakt's process ends in any way -- kill -9 included -- the pipe
closes, and the driver kills its whole group: no worker outlives the filtering proxy it depends on, so none can
fail URLs against a dead proxy and write a shard's stats (the resume marker) for them.

ARGS.json holds img2dataset.download's keyword arguments and `engine`, `ray_address`. The environment (proxy,
OPENCV_IO_MAX_IMAGE_PIXELS, NO_ALBUMENTATIONS_UPDATE) comes from rakt.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading


def die_with_parent() -> None:
    """Kill this process group once stdin reaches its end (the parent closed it, or died)."""
    def watch() -> None:
        while os.read(0, 4096):  # the raw descriptor: no lock a daemon thread could hold at exit
            pass
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="rakt-lifeline", daemon=True).start()


def main(argv: list[str]) -> int:
    die_with_parent()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks the package index otherwise
    os.dup2(2, 1)  # img2dataset prints its progress: to stderr, so that rakt's stdout stays its JSON summary
    with open(argv[0]) as f:
        args = json.load(f)
    engine, address = args.pop("engine"), args.pop("ray_address")
    args["max_image_area"] = args["max_image_area"] or float("inf")
    if engine == "ray":
        from rakt.pipeline.engines import connect_ray
        from rakt.pipeline.io import setup_logging

        setup_logging()
        connect_ray(address)  # a local Ray started here inherits the proxy environment
    import img2dataset

    img2dataset.download(**args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
