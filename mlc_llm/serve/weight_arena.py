"""CPU weights read into one anonymous mapping advised for transparent huge pages.

A decode step streams every weight once. In 4 KB pages that is a TLB miss per 4 KB (a two-level page walk in a VM)
and a restart of the hardware prefetchers at every page boundary; Linux backs a mapping advised `MADV_HUGEPAGE` with
2 MB pages where it has them (THP mode "madvise", the default of Ubuntu and Debian, leaves TVM's own allocations in
4 KB pages). The shards are read straight into the mapping: one copy, no second set of weights while loading.
`MLC_HUGE_PAGES=0` (or `device.huge_pages: false`) keeps TVM's loader.
"""
from __future__ import annotations

import mmap
import os
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .. import tensor_cache

ENV = "MLC_HUGE_PAGES"
HUGE = 2 << 20  # the x86-64 and arm64 transparent huge page
ALIGN = 4096  # each tensor starts on a page
_OFF = ("0", "false", "no", "off")


def wanted() -> bool:
    """Whether weights go into an arena: not switched off, and the platform can advise huge pages."""
    return os.environ.get(ENV, "1").strip().lower() not in _OFF and hasattr(mmap, "MADV_HUGEPAGE")


class Arena:
    """The mapping and the parameters' numpy views into it (in the order asked for)."""

    def __init__(self, nbytes: int):
        self._map = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:  # before the first touch: faults then take 2 MB pages
            self._map.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):  # no THP on this platform or kernel: ordinary pages
            pass
        whole = np.frombuffer(self._map, np.uint8)
        start = (-whole.ctypes.data) % HUGE  # huge pages need 2 MB-aligned addresses
        self.bytes = whole[start:start + nbytes]
        self.views: list[np.ndarray] = []

    @property
    def address(self) -> int:
        return self.bytes.ctypes.data

    def huge_page_bytes(self) -> int:
        """Bytes of the arena the kernel backs with huge pages now (from /proc/self/smaps; 0 where unreadable)."""
        lo, hi = self.address, self.address + self.bytes.nbytes
        total, inside = 0, False
        try:
            with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
                for line in f:
                    m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
                    if m:
                        inside = int(m.group(1), 16) < hi and int(m.group(2), 16) > lo
                    elif inside and line.startswith("AnonHugePages:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            return 0
        return min(total, self.bytes.nbytes)


def load(model_dir: str | Path, index: dict[str, Any], names: list[str]) -> Optional[Arena]:
    """The parameters `names` of the tensor cache `index` (read from `model_dir`) in an arena, or None where a record
    is not raw bytes of a numpy dtype (e.g. MLC's bfloat16 encodings): TVM's loader reads those."""
    where = tensor_cache.records_by_name(index)
    picked = [where[n] for n in names]
    try:
        dtypes = [np.dtype(r["dtype"]) for _, r in picked]
    except TypeError:
        return None
    if any(r.get("format", "raw") != "raw" or dt.kind not in "iuf" or r["nbytes"] != dt.itemsize *
           int(np.prod(r["shape"], dtype=np.int64)) for (_, r), dt in zip(picked, dtypes)):
        return None
    offsets, total = [], 0
    for _, r in picked:
        offsets.append(total)
        total += -(-r["nbytes"] // ALIGN) * ALIGN
    arena = Arena(max(total, ALIGN))
    by_file: dict[str, list[int]] = {}
    for i, (path, _) in enumerate(picked):
        by_file.setdefault(path, []).append(i)
    for path, items in by_file.items():
        with open(Path(model_dir) / path, "rb") as f:
            for i in sorted(items, key=lambda i: picked[i][1]["byteOffset"]):
                r = picked[i][1]
                dest = arena.bytes[offsets[i]:offsets[i] + r["nbytes"]]
                f.seek(r["byteOffset"])
                if f.readinto(memoryview(dest)) != r["nbytes"]:
                    raise OSError(f"'{path}' ended inside tensor '{r['name']}'")
    arena.views = [arena.bytes[o:o + r["nbytes"]].view(dt).reshape(r["shape"])
                   for o, (_, r), dt in zip(offsets, picked, dtypes)]
    return arena
