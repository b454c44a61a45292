"""Sector arithmetic of the traffic model: warp requests, 32-byte sectors, distinct bytes.

A GPU issues a load or store once per warp; the memory system serves it in 32-byte sectors. For
one block-wide access (what Triton's interpreter executes per ``tl.load``/``tl.store`` of a
program), the lanes of the row-major flattened block are split into requests of 32 consecutive
lanes (the lane order of Triton's blocked layouts for the 1D and [rows, 1] tiles of these
kernels; wider tiles may map lanes differently on a GPU). Masked-off lanes issue nothing, and a
request with no active lane is not counted. Per kernel launch, loads and stores apart:

* distinct bytes: the union of the bytes the active lanes touch (what a perfect cache would fetch
  from or write to HBM);
* bytes requested: active lanes x element size, summed over requests;
* sectors: per request, the distinct 32-byte sectors its active lanes touch, summed;
* efficiency: bytes used / (32 x sectors), where the bytes used by a request are the distinct
  bytes of its active lanes (lanes reading the same address share one fetch). A coalesced fp32
  warp uses 128 of 128 sector bytes (100%); a warp reading one fp32 from each of 32 rows uses 4
  of every 32 (12.5%).
"""

import dataclasses
from typing import Dict, List, Tuple

import numpy as np

WARP_SIZE = 32
SECTOR_BYTES = 32


@dataclasses.dataclass
class AccessTotals:
    """Totals of one kind of access (loads or stores) of one kernel launch.

    Attributes:
        requests: warp requests with at least one active lane.
        lanes: active lanes.
        bytes_requested: active lanes x element bytes.
        bytes_used: per request, the distinct bytes of its active lanes; summed.
        sectors: per request, the distinct 32-byte sectors of its active lanes; summed.
        distinct_bytes: bytes of the union of everything touched.
    """

    requests: int = 0
    lanes: int = 0
    bytes_requested: int = 0
    bytes_used: int = 0
    sectors: int = 0
    distinct_bytes: int = 0

    @property
    def sector_bytes(self) -> int:
        return self.sectors * SECTOR_BYTES

    @property
    def efficiency(self) -> float:
        """bytes_used / sector bytes (1.0 when nothing was requested)."""
        return self.bytes_used / self.sector_bytes if self.sectors else 1.0

    def __add__(self, other: "AccessTotals") -> "AccessTotals":
        return AccessTotals(*(a + b for a, b in zip(dataclasses.astuple(self),
                                                     dataclasses.astuple(other))))


def _distinct_pairs(a: np.ndarray, b: np.ndarray) -> int:
    if a.size == 0:
        return 0
    order = np.lexsort((b, a))
    a, b = a[order], b[order]
    return 1 + int(np.count_nonzero((a[1:] != a[:-1]) | (b[1:] != b[:-1])))


def warp_request_stats(
    addresses: np.ndarray, active: np.ndarray, elem_bytes: int,
    warp_size: int = WARP_SIZE, sector_bytes: int = SECTOR_BYTES,
) -> AccessTotals:
    """Splits one block-wide access into warp requests and counts their sectors.

    Args:
        addresses: byte address of every lane of the block, any shape (flattened row-major:
            lanes 0..31 are the first warp).
        active: lane mask, broadcastable to ``addresses``.
        elem_bytes: bytes per lane (the element size).
        warp_size: lanes per request.
        sector_bytes: bytes per memory sector.

    Returns:
        ``AccessTotals`` of this access (``distinct_bytes`` left 0: it needs the whole launch).
    """
    flat = np.asarray(addresses, dtype=np.uint64).reshape(-1)
    mask = np.broadcast_to(np.asarray(active, dtype=bool), np.shape(addresses)).reshape(-1)
    lanes = np.flatnonzero(mask)
    if lanes.size == 0:
        return AccessTotals()
    addr = flat[lanes]
    warp = (lanes // warp_size).astype(np.uint64)
    first = addr // np.uint64(sector_bytes)
    last = (addr + np.uint64(elem_bytes - 1)) // np.uint64(sector_bytes)
    # An element that straddles a sector boundary (misaligned) touches both sectors.
    straddle = last != first
    sec_warp = np.concatenate([warp, warp[straddle]])
    sectors = np.concatenate([first, last[straddle]])
    return AccessTotals(
        requests=int(np.unique(warp).size),
        lanes=int(lanes.size),
        bytes_requested=int(lanes.size) * elem_bytes,
        bytes_used=_distinct_pairs(warp, addr) * elem_bytes,
        sectors=_distinct_pairs(sec_warp, sectors),
    )


def union_segments(starts: np.ndarray, ends: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Merges half-open byte ranges [start, end) into disjoint sorted segments.

    Args:
        starts, ends: 1D integer arrays of equal length.

    Returns:
        (segment starts, segment ends), sorted and disjoint.
    """
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    if starts.size == 0:
        return starts, ends
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], ends[order]
    reach = np.maximum.accumulate(e)
    new = np.ones(s.size, dtype=bool)
    new[1:] = s[1:] > reach[:-1]
    heads = np.flatnonzero(new)
    return s[heads], np.maximum.reduceat(e, heads)


class AccessLog:
    """Accumulates the accesses of one kind (loads or stores) of one kernel launch."""

    def __init__(self) -> None:
        self.totals = AccessTotals()
        self._addresses: Dict[int, List[np.ndarray]] = {}

    def add(self, addresses: np.ndarray, active: np.ndarray, elem_bytes: int) -> None:
        """Records one block-wide access (see ``warp_request_stats`` for the arguments)."""
        self.totals = self.totals + warp_request_stats(addresses, active, elem_bytes)
        mask = np.broadcast_to(np.asarray(active, dtype=bool), np.shape(addresses))
        touched = np.asarray(addresses, dtype=np.uint64)[mask]
        if touched.size:
            self._addresses.setdefault(elem_bytes, []).append(np.unique(touched))

    def segments(self) -> Tuple[np.ndarray, np.ndarray]:
        """Disjoint [start, end) byte segments of everything recorded."""
        starts, ends = [], []
        for size, chunks in self._addresses.items():
            unique = np.unique(np.concatenate(chunks)).astype(np.int64)
            self._addresses[size] = [unique.astype(np.uint64)]
            starts.append(unique)
            ends.append(unique + size)
        if not starts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return union_segments(np.concatenate(starts), np.concatenate(ends))

    def result(self) -> AccessTotals:
        """The totals with ``distinct_bytes`` filled in."""
        seg_s, seg_e = self.segments()
        return dataclasses.replace(self.totals, distinct_bytes=int((seg_e - seg_s).sum()))

    def distinct_bytes_within(self, start: int, end: int) -> int:
        """Distinct bytes touched inside [start, end)."""
        seg_s, seg_e = self.segments()
        overlap = np.minimum(seg_e, end) - np.maximum(seg_s, start)
        return int(np.clip(overlap, 0, None).sum())
