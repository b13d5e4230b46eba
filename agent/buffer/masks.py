"""Privacy masks: parts of the picture that are never recorded.

A resident draws polygons over what the camera must not keep (a neighbour's
window, the street, a child's bedroom window across the way). The pixels
inside are set to black *before* a frame reaches the encoder, so the masked
content never exists in any stored segment, clip or delivery: there is
nothing to unmask later. That is why an encoded camera (RTSP) with a mask is
decoded, masked and re-encoded rather than stored as it is.

The mask is rasterised once (``cv2.fillPoly``) into a keep/black image, so
applying it per frame is a ``cv2.bitwise_and`` over each polygon's
bounding box only — in place, cheaper than copying the frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from agent.errors import UserError

Polygon = Sequence[Sequence[int]]


class PrivacyMask:
    """Black out ``polygons`` (pixel ``[x, y]`` points, origin top-left) in ``width x height`` frames.

    ``drawn_for=(w, h)`` says which frame size the polygons were drawn on; if
    the camera delivers another size (a webcam that cannot do the configured
    resolution), the polygons are scaled to it so they still cover the same
    part of the scene. Points are pixel corners, so ``[width, height]`` is a
    valid point (the bottom-right corner of the picture).
    """

    def __init__(self, polygons: Sequence[Polygon], width: int, height: int, *,
                 drawn_for: tuple[int, int] | None = None) -> None:
        if width <= 0 or height <= 0:
            raise ValueError(f"frame size must be positive, got {width}x{height}")
        self.width, self.height = width, height
        src_w, src_h = drawn_for or (width, height)
        scaled: list[np.ndarray] = []
        for i, poly in enumerate(polygons):
            pts = _validated(i, poly, src_w, src_h)
            if (src_w, src_h) != (width, height):
                pts = pts * np.array([width / src_w, height / src_h])
            scaled.append(np.round(pts).astype(np.int32))
        self.polygons: list[np.ndarray] = scaled
        # One (box, keep-image) per polygon's bounding box: a mask over a corner only touches that corner.
        # Boxes may overlap; AND-ing a pixel twice with the same mask is harmless.
        self._boxes: list[tuple[slice, slice, np.ndarray]] = []
        self.masked_fraction = 0.0
        if scaled:
            black = np.zeros((height, width), np.uint8)
            cv2.fillPoly(black, scaled, 255)
            self.masked_fraction = float(np.count_nonzero(black)) / (width * height)
            for pts in scaled:
                x, y, w, h = cv2.boundingRect(pts)
                rows, cols = slice(max(0, y), min(height, y + h)), slice(max(0, x), min(width, x + w))
                keep = np.where(black[rows, cols] > 0, 0, 255).astype(np.uint8)
                self._boxes.append((rows, cols, np.ascontiguousarray(np.repeat(keep[:, :, None], 3, axis=2))))
        self._full: np.ndarray | None = None
        if self._boxes and sum((b[0].stop - b[0].start) * (b[1].stop - b[1].start) for b in self._boxes) >= width * height:
            # Boxes as big as the picture: one pass over a full-size keep image is cheaper.
            self._full = np.ascontiguousarray(np.repeat(np.where(black > 0, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2))
            self._boxes = []

    @property
    def empty(self) -> bool:
        return not self.polygons

    def apply(self, image: np.ndarray, *, inplace: bool = False) -> np.ndarray:
        """The frame with the polygons black; a new array unless ``inplace``.

        Frames from this package's sources are fresh arrays nobody else holds,
        so the recorder can pass ``inplace=True`` and skip a copy. Always use
        the returned array.
        """
        if image.shape != (self.height, self.width, 3) or image.dtype != np.uint8:
            raise ValueError(
                f"privacy mask is for {self.width}x{self.height} BGR uint8 frames, "
                f"got shape {image.shape} {image.dtype}"
            )
        if not image.flags.c_contiguous:
            image, inplace = np.ascontiguousarray(image), True  # OpenCV could not write into a strided view
        if self._full is not None:
            return cv2.bitwise_and(image, self._full, dst=image if inplace else None)
        out = image if inplace else image.copy()
        for rows, cols, keep in self._boxes:
            region = out[rows, cols]
            result = cv2.bitwise_and(region, keep, dst=region)
            if result is not region:  # OpenCV wrote elsewhere: never hand back an unmasked frame
                out[rows, cols] = result
        return out

    def describe(self) -> str:
        if self.empty:
            return "no privacy mask"
        n = len(self.polygons)
        return f"{n} privacy mask{'s' if n > 1 else ''} covering {self.masked_fraction:.1%} of the picture"


def _validated(i: int, poly: Polygon, width: int, height: int) -> np.ndarray:
    where = f"camera.masks[{i}]"
    try:
        pts = np.asarray(poly, dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(f"{where} must be a list of [x, y] pixel points, like [[0, 0], [200, 0], [200, 120]]") from None
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise UserError(f"{where} must be a list of [x, y] pixel points, like [[0, 0], [200, 0], [200, 120]]")
    if len(pts) < 3:
        raise UserError(f"{where} has {len(pts)} points; a polygon needs at least 3 [x, y] points")
    for x, y in pts:
        if not (0 <= x <= width and 0 <= y <= height):
            raise UserError(
                f"{where} point [{x:g}, {y:g}] lies outside the {width}x{height} picture; "
                f"x must be 0..{width} and y 0..{height} (pixels from the top-left corner)"
            )
    # Shoelace area: three points on a line mask nothing, which is surely not what was meant.
    x, y = pts[:, 0], pts[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    if area < 1.0:
        raise UserError(f"{where} encloses no area (its points lie on a line); draw at least a small triangle or box")
    return pts
