"""Geohash cells, for request topics (protocol section 2).

The agent subscribes to its own cell at the resident's precision; the
requester publishes to every precision-5 cell the request circle touches.
"""

from __future__ import annotations

_BASE32 = "0123456789bcdefghjkmnpqrstuvwxyz"


def encode(lat: float, lon: float, precision: int) -> str:
    """The geohash of a point, ``precision`` characters long (0 gives '')."""
    if not 0 <= precision <= 12:
        raise ValueError("geohash precision must be 0..12")
    ranges = [[-180.0, 180.0], [-90.0, 90.0]]  # bits alternate: longitude first, then latitude
    values = (lon, lat)
    out: list[str] = []
    ch = 0
    for i in range(precision * 5):
        r = ranges[i % 2]
        mid = (r[0] + r[1]) / 2
        bit = values[i % 2] >= mid
        r[0 if bit else 1] = mid
        ch = ch * 2 + bit
        if i % 5 == 4:
            out.append(_BASE32[ch])
            ch = 0
    return "".join(out)


def bounds(cell: str) -> tuple[float, float, float, float]:
    """(lat_min, lat_max, lon_min, lon_max) of a cell."""
    ranges = [[-180.0, 180.0], [-90.0, 90.0]]
    i = 0
    for c in cell:
        idx = _BASE32.index(c)
        for shift in range(4, -1, -1):
            r = ranges[i % 2]
            r[0 if (idx >> shift) & 1 else 1] = (r[0] + r[1]) / 2
            i += 1
    (lon_lo, lon_hi), (lat_lo, lat_hi) = ranges
    return lat_lo, lat_hi, lon_lo, lon_hi


def request_topic(root: str, cell5: str) -> str:
    """``{root}/v1/requests/g/e/o/h/s``: one level per character of a precision-5 cell."""
    if len(cell5) != 5:
        raise ValueError("request topics use precision-5 cells")
    return f"{root}/v1/requests/" + "/".join(cell5)


def subscription_filter(root: str, lat: float, lon: float, precision: int) -> str:
    """What the agent subscribes to: its own cell's prefix at ``precision`` (0 = every request)."""
    prefix = encode(lat, lon, precision)
    return f"{root}/v1/requests/" + "".join(c + "/" for c in prefix) + "#"
