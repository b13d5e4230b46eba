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
    lat_lo, lat_hi, lon_lo, lon_hi = -90.0, 90.0, -180.0, 180.0
    out: list[str] = []
    bits = 0
    ch = 0
    even = True
    while len(out) < precision:
        if even:
            mid = (lon_lo + lon_hi) / 2
            if lon >= mid:
                ch = ch * 2 + 1
                lon_lo = mid
            else:
                ch *= 2
                lon_hi = mid
        else:
            mid = (lat_lo + lat_hi) / 2
            if lat >= mid:
                ch = ch * 2 + 1
                lat_lo = mid
            else:
                ch *= 2
                lat_hi = mid
        even = not even
        bits += 1
        if bits == 5:
            out.append(_BASE32[ch])
            bits = 0
            ch = 0
    return "".join(out)


def bounds(cell: str) -> tuple[float, float, float, float]:
    """(lat_min, lat_max, lon_min, lon_max) of a cell."""
    lat_lo, lat_hi, lon_lo, lon_hi = -90.0, 90.0, -180.0, 180.0
    even = True
    for c in cell:
        idx = _BASE32.index(c)
        for shift in range(4, -1, -1):
            bit = (idx >> shift) & 1
            if even:
                mid = (lon_lo + lon_hi) / 2
                lon_lo, lon_hi = (mid, lon_hi) if bit else (lon_lo, mid)
            else:
                mid = (lat_lo + lat_hi) / 2
                lat_lo, lat_hi = (mid, lat_hi) if bit else (lat_lo, mid)
            even = not even
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
