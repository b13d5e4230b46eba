"""The one place that turns ``[camera]`` settings into a :class:`~agent.buffer.capture.Source`.

With a privacy mask set, every source is asked for raw frames (RTSP and
files are decoded, the Pi camera skips its hardware encoder): masked pixels
are blacked out before anything is encoded, so they never reach storage.
Making that choice here means no caller can forget it.
"""

from __future__ import annotations

from agent.buffer.capture import Source
from agent.config import CameraConfig
from agent.errors import UserError


def make_source(camera: CameraConfig, *, realtime: bool = True) -> Source:
    """A source for ``camera``; ``realtime=False`` lets synthetic and file sources run as fast as they can."""
    raw = bool(camera.masks)
    if camera.source == "synthetic":
        from agent.buffer.capture.synthetic import SyntheticSource

        return SyntheticSource(camera.width, camera.height, camera.fps, realtime=realtime)
    if camera.source == "v4l2":
        from agent.buffer.capture.v4l2 import V4L2Source

        return V4L2Source(camera.device, camera.width, camera.height, camera.fps)
    if camera.source in ("rtsp", "file"):
        from agent.buffer.capture.stream import StreamSource

        # CameraConfig has checked the address (an rtsp:// one for an RTSP camera), so `config check` catches it too.
        if not camera.url:
            raise UserError(f"camera.source = {camera.source!r} needs camera.url (an rtsp:// address or a file path)")
        live = camera.source == "rtsp"
        return StreamSource(camera.url, live=live, raw=raw, realtime=realtime or live, start_at="now")
    if camera.source == "picamera2":
        from agent.buffer.capture.picamera2 import (
            MIN_PICAMERA2,
            Picamera2Source,
            picamera2_import_error,
            picamera2_version,
        )

        error = picamera2_import_error()
        if error is not None:
            raise UserError(picamera2_problem(error))
        version = picamera2_version()
        if version is not None and version < MIN_PICAMERA2:
            raise UserError(
                f"picamera2 {'.'.join(map(str, version))} is too old: the agent needs "
                f"{'.'.join(map(str, MIN_PICAMERA2))} or later (capture timeouts, so a stalled camera "
                "cannot hang the recorder). Run `sudo apt update && sudo apt full-upgrade`."
            )
        return Picamera2Source(camera.width, camera.height, camera.fps,
                               keyframe_interval_s=camera.keyframe_interval_s, raw=raw)
    raise UserError(f"camera.source = {camera.source!r} is not a known camera type")  # pragma: no cover - config validates


def picamera2_problem(error: str) -> str:
    """What to tell the resident when ``import picamera2`` failed, with the real error in it."""
    if "No module named 'picamera2'" in error:
        return (
            "camera.source = 'picamera2' needs the picamera2 library, which is not installed here. "
            "On the Raspberry Pi run `sudo apt install python3-picamera2` and make the agent's venv "
            "with --system-site-packages so it can see it; on other machines use source = 'v4l2' or 'rtsp'."
        )
    hint = ""
    if "dtype size changed" in error or "numpy" in error.lower():
        hint = (" The venv's numpy is not the one Raspberry Pi OS's simplejpeg (which picamera2 loads) "
                "was built for: run install.sh again, which keeps numpy below 2 on a Pi "
                "(hardware/pi-constraints.txt; pip users: install doorbell-agent[pi]).")
    return f"picamera2 is installed but could not be loaded: {error}.{hint}"
