"""The CPU line the benchmarks print beside their figures."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo (else platform) and the logical core count."""
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} logical cores"
