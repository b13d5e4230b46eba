"""A real RTSP camera for tests: GStreamer's RTSP server streaming H.264 of frames fed on stdin.

Run by Debian's ``/usr/bin/python3`` (GStreamer's Python bindings, ``gi``, are
not installable into the project's virtual environment), as a subprocess of
the test:

    /usr/bin/python3 tests/rtsp_server.py --port 0 --width 320 --height 240 --fps 15 --sent SENT_FILE

It prints ``URL rtsp://127.0.0.1:PORT/door`` and then ``READY`` on stdout.

Frames come in on stdin, each an 8-byte little-endian signed capture time in
microseconds followed by ``width * height * 3`` bytes of BGR pixels. The test
draws them (the project's synthetic camera: a QR code of the capture time) at
the moment it writes them, so the time in a picture is the time it was handed
to the server. Frames arriving while no client is watching are thrown away, as
a camera's would be; every frame actually pushed into the stream is written to
``--sent`` as one line with its capture time, so a test can compare a
recording frame by frame with what the camera sent.

Encoding is what a doorbell does: x264 ``tune=zerolatency`` (no B-frames, no
lookahead), a keyframe every ``--keyint`` frames (default: one second's
worth), one slice per picture unless ``--slices`` says otherwise, RTP packetised
by ``rtph264pay`` with SPS/PPS before each keyframe.

``--switch-size WxH --switch-after N`` (or the environment variable
``RTSP_SERVER_SWITCH=WxH@N``, for tests that start the server through a helper)
makes the camera change its resolution after N frames sent: the pictures are
scaled, x264 starts again with a new SPS and a keyframe, as a doorbell does when
its settings change while a client watches.

Why not have the server draw the QR codes itself: Debian's Python has neither
OpenCV nor a QR library, and GStreamer's ``qroverlay`` takes its text as a
property, which cannot be tied to one exact buffer.
"""

from __future__ import annotations

import argparse
import os
import signal
import struct
import sys
import threading
from typing import BinaryIO

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


class Camera:
    """Holds the appsrc of the one shared media while a client watches."""

    def __init__(self, width: int, height: int, fps: int, sent_path: str | None) -> None:
        self.frame_bytes = width * height * 3
        self.lock = threading.Lock()
        self.appsrc: Gst.Element | None = None
        self.size_filter: Gst.Element | None = None
        self.switch: tuple[int, str] | None = None  # (after this many frames sent, new caps)
        self.pushed = 0
        self.sent = open(sent_path, "a", buffering=1) if sent_path else None  # kept open for the life of the process

    def attach(self, appsrc: Gst.Element, size_filter: Gst.Element | None = None) -> None:
        with self.lock:
            self.appsrc = appsrc
            self.size_filter = size_filter

    def detach(self) -> None:
        with self.lock:
            self.appsrc = None

    def feed(self, stream: BinaryIO) -> None:
        """Read frames from stdin until it closes; push each to the stream if someone watches."""
        header = struct.Struct("<q")
        while True:
            head = stream.read(header.size)
            data = stream.read(self.frame_bytes) if head else b""
            if len(head) < header.size or len(data) < self.frame_bytes:
                break
            (capture_us,) = header.unpack(head)
            with self.lock:
                src = self.appsrc
                if src is None:
                    continue
                if src.emit("push-buffer", Gst.Buffer.new_wrapped(data)) != Gst.FlowReturn.OK:
                    continue
                if self.sent is not None:
                    self.sent.write(f"{capture_us}\n")
                self.pushed += 1
                if self.switch is not None and self.pushed == self.switch[0] and self.size_filter is not None:
                    self.size_filter.set_property("caps", Gst.Caps.from_string(self.switch[1]))
        GLib.idle_add(loop.quit)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1; 0 picks a free one")
    ap.add_argument("--path", default="/door")
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--fps", type=int, default=15)
    ap.add_argument("--keyint", type=int, default=0, help="frames between keyframes (default: fps, one second)")
    ap.add_argument("--slices", type=int, default=1,
                    help="slices per picture (x264 sliced threads), as some cameras send; default one")
    ap.add_argument("--sent", default=None, help="file to append the capture time of every frame sent to")
    env_switch = os.environ.get("RTSP_SERVER_SWITCH", "")
    ap.add_argument("--switch-size", default=env_switch.partition("@")[0], help="WxH to switch to (see above)")
    ap.add_argument("--switch-after", type=int, default=int(env_switch.partition("@")[2] or 0),
                    help="frames sent before the resolution changes")
    args = ap.parse_args()

    Gst.init(None)
    keyint = args.keyint or args.fps
    camera = Camera(args.width, args.height, args.fps, args.sent)
    if args.switch_size and args.switch_after:
        sw, sh = args.switch_size.split("x")
        camera.switch = (args.switch_after, f"video/x-raw,format=I420,width={int(sw)},height={int(sh)}")
    threads = f"threads={args.slices} sliced-threads=true" if args.slices > 1 else "threads=1"
    # SPS and PPS go before every keyframe (config-interval=-1), as doorbells send them. With several
    # slices, rtph264pay would put them before each slice of the keyframe, which by H.264 7.4.1.2.3
    # starts a new access unit (FFmpeg then splits the picture in two); x264's own in-band headers
    # before the first slice are used instead.
    config_interval = 0 if args.slices > 1 else -1
    caps = f"video/x-raw,format=BGR,width={args.width},height={args.height},framerate={args.fps}/1"
    launch = (
        f"( appsrc name=cam is-live=true do-timestamp=true format=time block=false max-bytes={camera.frame_bytes * 4} "
        f"caps={caps} ! videoconvert ! videoscale method=nearest-neighbour ! capsfilter name=size caps=video/x-raw,format=I420 "
        f"! x264enc tune=zerolatency speed-preset=ultrafast {threads} key-int-max={keyint} "
        f"! video/x-h264,profile=constrained-baseline ! rtph264pay name=pay0 pt=96 config-interval={config_interval} )"
    )
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch)
    factory.set_shared(True)

    def configured(_factory: GstRtspServer.RTSPMediaFactory, media: GstRtspServer.RTSPMedia) -> None:
        appsrc = media.get_element().get_child_by_name("cam")
        camera.attach(appsrc, media.get_element().get_child_by_name("size"))
        media.connect("unprepared", lambda _m: camera.detach())

    factory.connect("media-configure", configured)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    server.get_mount_points().add_factory(args.path, factory)
    if server.attach(None) == 0:
        print(f"ERROR cannot listen on 127.0.0.1:{args.port}", flush=True)
        sys.exit(1)
    print(f"URL rtsp://127.0.0.1:{server.get_bound_port()}{args.path}", flush=True)

    global loop
    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGINT, loop.quit)
    threading.Thread(target=camera.feed, args=(sys.stdin.buffer,), daemon=True).start()
    print("READY", flush=True)
    loop.run()
    # Leave without waiting for the reader thread, which may sit in a read on stdin.
    sys.stdout.flush()
    os._exit(0)


loop: GLib.MainLoop

if __name__ == "__main__":
    main()
