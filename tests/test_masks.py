"""Privacy masks: what a resident masks is black in the stored video, and nothing else is."""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from agent.buffer.capture.synthetic import SyntheticSource
from agent.buffer.masks import PrivacyMask
from agent.buffer.segmentfile import EncoderSettings, SegmentFile
from agent.errors import UserError

W, H = 320, 240
# A neighbour's window (a box) and a slice of street (a triangle), away from the QR code in the corner.
POLYGONS = [
    [[150, 20], [300, 20], [300, 110], [150, 110]],
    [[40, 235], [200, 140], [240, 235]],
]


def _region(polygons: list[list[list[int]]], erode_px: int) -> np.ndarray:
    """Boolean image of the polygons, shrunk (erode_px > 0) or grown (< 0) to stay clear of codec edges."""
    m = np.zeros((H, W), np.uint8)
    cv2.fillPoly(m, [np.array(p, np.int32) for p in polygons], 255)
    k = np.ones((2 * abs(erode_px) + 1,) * 2, np.uint8)
    m = cv2.erode(m, k) if erode_px > 0 else cv2.dilate(m, k)
    return m > 0


def test_masked_pixels_are_black_in_the_decoded_stored_video(tmp_path: Path) -> None:
    source = SyntheticSource(W, H, 15, realtime=False, start_us=1_750_000_000_000_000)
    source.open()
    mask = PrivacyMask(POLYGONS, W, H)
    seg = SegmentFile(tmp_path / "seg.mp4", settings=EncoderSettings("libx264", W, H, 15))
    originals = []
    for _ in range(12):
        frame = source.read()
        originals.append(frame.image)
        seg.add_frame(type(frame)(frame.capture_us, mask.apply(frame.image)))
    info = seg.finish()
    assert info is not None and info.frames == 12

    with av.open(str(info.path)) as container:
        decoded = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    assert len(decoded) == 12

    inside, outside = _region(POLYGONS, 3), ~_region(POLYGONS, -3)
    for original, stored in zip(originals, decoded, strict=True):
        # The scene under the mask is not dark, so black there means the mask worked.
        assert original[inside].mean() > 60
        assert stored[inside].max() <= 24, "masked pixels must be black in what is stored"
        assert stored[inside].mean() < 4
        # Everything else survives: close to the camera's picture, and far from black.
        diff = np.abs(stored[outside].astype(int) - original[outside].astype(int))
        assert diff.mean() < 6
        assert stored[outside].mean() > 60


def test_apply_copies_unless_asked_to_work_in_place() -> None:
    mask = PrivacyMask(POLYGONS, W, H)
    image = np.full((H, W, 3), 200, np.uint8)
    out = mask.apply(image)
    assert (image == 200).all(), "the caller's frame is left alone"
    region = _region(POLYGONS, 0)
    assert (out[region] == 0).all()
    assert (out[~_region(POLYGONS, -1)] == 200).all()
    same = mask.apply(image, inplace=True)
    assert same is image and (image[region] == 0).all()


def test_mask_covering_the_whole_picture_blacks_out_everything() -> None:
    mask = PrivacyMask([[[0, 0], [W, 0], [W, H], [0, H]]], W, H)
    assert not mask.apply(np.full((H, W, 3), 255, np.uint8)).any()
    assert mask.masked_fraction == pytest.approx(1.0)


def test_empty_mask_changes_nothing() -> None:
    mask = PrivacyMask([], W, H)
    assert mask.empty
    image = np.random.default_rng(1).integers(0, 255, (H, W, 3), dtype=np.uint8)
    assert np.array_equal(mask.apply(image), image)
    assert mask.describe() == "no privacy mask"


def test_polygons_drawn_at_another_size_are_scaled() -> None:
    # Drawn on the configured 1280x720 picture; the webcam delivers 640x360.
    mask = PrivacyMask([[[640, 0], [1280, 0], [1280, 360], [640, 360]]], 640, 360, drawn_for=(1280, 720))
    out = mask.apply(np.full((360, 640, 3), 99, np.uint8))
    assert (out[:178, 322:] == 0).all()  # the top-right quarter
    assert (out[182:, :] == 99).all() and (out[:, :318] == 99).all()


@pytest.mark.parametrize(
    ("polygon", "words"),
    [
        ([[0, 0], [400, 0], [0, 100]], "outside the 320x240 picture"),
        ([[0, 0], [10, 10]], "at least 3"),
        ([[0, 0], [10, 10], [20, 20]], "no area"),
        ([[0, 0, 1], [1, 1, 1], [2, 0, 0]], "[x, y] pixel points"),
    ],
)
def test_bad_polygons_are_refused_with_the_field_named(polygon: list[list[int]], words: str) -> None:
    with pytest.raises(UserError) as err:
        PrivacyMask([[[1, 1], [5, 1], [5, 5]], polygon], W, H)
    assert "camera.masks[1]" in str(err.value)
    assert words in str(err.value)


def test_a_frame_of_the_wrong_size_is_an_error_not_an_unmasked_frame() -> None:
    mask = PrivacyMask(POLYGONS, W, H)
    with pytest.raises(ValueError, match="320x240"):
        mask.apply(np.zeros((480, 640, 3), np.uint8))


def test_strided_frames_are_masked_too() -> None:
    mask = PrivacyMask(POLYGONS, W, H)
    wide = np.full((H, 2 * W, 3), 180, np.uint8)
    view = wide[:, ::2]  # not contiguous: OpenCV cannot write into it directly
    out = mask.apply(view, inplace=True)
    assert (out[_region(POLYGONS, 0)] == 0).all()
    assert (out[~_region(POLYGONS, -1)] == 180).all()
