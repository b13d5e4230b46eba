"""A stand-in for picamera2 that blocks the way the real one does (picamera2 0.3.36, read on GitHub).

This machine has no Pi camera and picamera2 cannot be installed, so tests install this module as
``picamera2`` in ``sys.modules``. What it copies from the real library, because the bugs live there:

- ``Job`` (picamera2/job.py): a list of functions returning ``(done, result)`` backed by a
  ``concurrent.futures.Future``; ``get_result(timeout)`` raises ``TimeoutError``, a cancelled job
  raises ``CancelledError``, an exception inside a function is set on the future.
- ``dispatch_functions`` queues the job on ``_job_list`` and waits on its future: with ``wait=None``
  and no signal function it waits for ever; a number is a timeout in seconds.
- ``process_requests`` runs in the event loop thread (the "NULL preview" that ``start()`` starts)
  when a frame completes or the loop is prodded; it executes jobs *in order* and stops at the first
  one that is not done. So with a stalled sensor a ``capture_request`` job never finishes, and
  ``stop()`` — itself a job dispatched with ``wait=True, immediate=True`` — queues behind it.
- ``cancel_all_and_flush`` cancels every queued job and empties the list.
- ``post_callback(request)`` runs for each completed request before the encoders see it.
- ``close()`` calls ``stop()``; ``stop_recording()`` calls ``stop()`` then ``stop_encoder()``.

The "sensor" is a thread producing one request per frame period while started and not stalled.
Each request's metadata has ``SensorTimestamp`` (CLOCK_MONOTONIC ns at the start of readout),
``ExposureTime`` (µs) and, if ``frame_wall_clock`` is set, ``FrameWallClock`` (ns since the epoch).
"""

from __future__ import annotations

import threading
import time
import types
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import Any

import numpy as np

EXPOSURE_US = 20_000


class Job:
    def __init__(self, functions: list[Callable[[], tuple[bool, Any]]], signal_function: Any = None) -> None:
        self._functions = functions
        self._future: Future[Any] = Future()
        self._future.set_running_or_notify_cancel()
        self._signal_function = signal_function
        self._result: Any = None

    def execute(self) -> bool:
        try:
            result = None
            while self._functions:
                done, result = self._functions[0]()
                if not done:
                    break
                self._functions.pop(0)
            if not self._functions:
                self._result = result
        except Exception as e:  # noqa: BLE001 - as picamera2 does
            self._future.set_exception(e)
            self._functions = []
        return not self._functions

    def signal(self) -> None:
        if not self._future.done():
            self._future.set_result(self._result)

    def get_result(self, timeout: float | None = None) -> Any:
        return self._future.result(timeout=timeout)

    def cancel(self) -> None:
        if not self._future.done():
            self._future.set_exception(CancelledError())


class CompletedRequest:
    def __init__(self, image: np.ndarray, metadata: dict[str, Any]) -> None:
        self._image = image
        self._metadata = metadata
        self.released = False

    def make_array(self, name: str) -> np.ndarray:
        assert name == "main"
        return self._image.copy()

    def get_metadata(self) -> dict[str, Any]:
        return dict(self._metadata)

    def release(self) -> None:
        self.released = True

    def acquire(self) -> None:
        pass


class Picamera2:
    """The parts of ``picamera2.Picamera2`` the agent uses, with their blocking behaviour."""

    instances: list[Picamera2] = []
    fps = 30.0
    frame_wall_clock = False
    fail_with: Exception | None = None  # raised inside the next capture job, as libcamera errors are

    def __init__(self, camera_num: int = 0, verbose_console: Any = None, tuning: Any = None,
                 allocator: Any = None) -> None:
        self.lock = threading.Lock()
        self._job_list: list[Job] = []
        self.completed_requests: list[CompletedRequest] = []
        self.post_callback: Callable[[CompletedRequest], None] | None = None
        self.started = False
        self.is_open = True
        self.stalled = False
        self.size = (320, 240)
        self.frames = 0
        self.wall_at_readout_us: dict[int, int] = {}
        self.encoder: Any = None
        self.last_encoder: Any = None
        self.output: Any = None
        self._wake = threading.Condition()
        self._prodded = False
        self._quit = False
        self._loop = threading.Thread(target=self._event_loop, daemon=True, name="fake-picamera2-loop")
        self._loop.start()
        Picamera2.instances.append(self)

    # configuration
    def create_video_configuration(self, main: dict[str, Any] | None = None, lores: Any = None, raw: Any = None,
                                   transform: Any = None, colour_space: Any = None, buffer_count: int = 6,
                                   controls: dict[str, Any] | None = None, display: Any = None,
                                   encode: str = "main", queue: bool = True, sensor: Any = None,
                                   use_case: str = "video") -> dict[str, Any]:
        return {"main": dict(main or {}), "controls": dict(controls or {}), "buffer_count": buffer_count}

    def configure(self, camera_config: dict[str, Any] | None = None) -> None:
        if camera_config and "size" in camera_config["main"]:
            self.size = tuple(camera_config["main"]["size"])  # type: ignore[assignment]
        self.camera_config = camera_config

    # start / stop
    def start(self, config: Any = None, show_preview: bool | None = False) -> None:
        self.started = True
        with self._wake:
            self._wake.notify_all()

    def stop_(self, request: Any = None) -> tuple[bool, None]:
        self.started = False
        self.completed_requests = []
        return (True, None)

    def stop(self) -> None:
        if not self.started:
            return
        # The event loop runs in its own thread (the NULL preview), so stop is a queued job.
        self.dispatch_functions([self.stop_], wait=True, immediate=True)

    def close(self) -> None:
        if not self.is_open:
            return
        self.stop()
        self.is_open = False

    def start_recording(self, encoder: Any, output: Any, pts: Any = None, config: Any = None,
                        quality: Any = None, name: Any = None) -> None:
        self.encoder, self.output = encoder, output
        self.last_encoder = encoder
        self.start()

    def stop_recording(self) -> None:
        self.stop()
        self.encoder = None

    # jobs
    def dispatch_functions(self, functions: list[Callable[[], tuple[bool, Any]]], wait: Any,
                           signal_function: Any = None, immediate: bool = False) -> Any:
        if wait is None:
            wait = signal_function is None
        timeout = None if wait is True else wait
        with self.lock:
            job = Job(functions, signal_function)
            self._job_list.append(job)
        self._run_process_requests()
        return job.get_result(timeout=timeout) if wait else job

    def capture_request_(self) -> tuple[bool, Any]:
        if Picamera2.fail_with is not None:
            exc, Picamera2.fail_with = Picamera2.fail_with, None
            raise exc
        if not self.completed_requests:
            return (False, None)
        return (True, self.completed_requests.pop(0))

    def capture_request(self, wait: Any = None, signal_function: Any = None, flush: Any = None) -> Any:
        return self.dispatch_functions([lambda: (True, None), self.capture_request_], wait, signal_function)

    def cancel_all_and_flush(self) -> None:
        with self.lock:
            for job in self._job_list:
                job.cancel()
            self._job_list = []

    # the camera's own thread
    def _run_process_requests(self) -> None:
        with self._wake:
            self._prodded = True
            self._wake.notify_all()

    def _event_loop(self) -> None:
        period = 1 / self.fps
        due = [time.monotonic()]  # when the sensor's next frame completes

        def ready() -> bool:
            return self._prodded or self._quit or (self.started and not self.stalled and time.monotonic() >= due[0])

        while not self._quit:
            with self._wake:
                self._wake.wait_for(ready, timeout=max(0.001, due[0] - time.monotonic()))
                self._prodded = False
            new = []
            if self.started and not self.stalled and time.monotonic() >= due[0]:
                due[0] = max(due[0] + period, time.monotonic() - period)
                new.append(self._new_request())
            elif not self.started or self.stalled:
                due[0] = time.monotonic() + period
            self._process_requests(new)

    def _new_request(self) -> CompletedRequest:
        readout_ns = time.monotonic_ns()
        wall_us = time.time_ns() // 1000
        self.frames += 1
        w, h = self.size
        md: dict[str, Any] = {"SensorTimestamp": readout_ns, "ExposureTime": EXPOSURE_US, "FrameDuration": 33_333}
        if self.frame_wall_clock:
            md["FrameWallClock"] = wall_us * 1000
        self.wall_at_readout_us[readout_ns] = wall_us
        # RGB888 is B, G, R in memory; stride padding shows up as extra columns in make_array.
        image = np.zeros((h, w + 16, 3), np.uint8)
        image[:, :, 0] = self.frames % 256
        return CompletedRequest(image, md)

    def _process_requests(self, requests: list[CompletedRequest]) -> None:
        finished = []
        with self.lock:
            self.completed_requests += requests
            while self._job_list:
                if self._job_list[0].execute():
                    finished.append(self._job_list.pop(0))
                else:
                    break
            for req in requests:
                if self.post_callback:
                    self.post_callback(req)
            while len(self.completed_requests) > 1:
                self.completed_requests.pop(0).release()
        for job in finished:
            job.signal()

    def shut_down_for_test(self) -> None:
        """Release every thread a test left waiting (the real camera would need a reboot)."""
        self.cancel_all_and_flush()
        self._quit = True
        self._run_process_requests()


class H264Encoder:
    def __init__(self, bitrate: int | None = None, repeat: bool = True, iperiod: int | None = None,
                 framerate: float | None = None, enable_sps_framerate: bool = False, qp: int | None = None,
                 profile: str | None = None) -> None:
        self.bitrate, self.repeat, self.iperiod = bitrate, repeat, iperiod
        self.firsttimestamp: int | None = None


class Output:
    def __init__(self, pts: Any = None) -> None:
        self.recording = False

    def start(self) -> None:
        self.recording = True


class Platform:
    VC4 = 0
    PISP = 1


def install(monkeypatch: Any) -> types.ModuleType:
    """Put this stand-in in ``sys.modules`` as ``picamera2`` (and its submodules)."""
    Picamera2.instances = []
    Picamera2.fail_with = None
    Picamera2.frame_wall_clock = False
    root = types.ModuleType("picamera2")
    root.Picamera2 = Picamera2  # type: ignore[attr-defined]
    encoders = types.ModuleType("picamera2.encoders")
    encoders.H264Encoder = H264Encoder  # type: ignore[attr-defined]
    outputs = types.ModuleType("picamera2.outputs")
    outputs.Output = Output  # type: ignore[attr-defined]
    platform = types.ModuleType("picamera2.platform")
    platform.Platform = Platform  # type: ignore[attr-defined]
    platform.get_platform = lambda: Platform.VC4  # type: ignore[attr-defined]
    root.encoders, root.outputs, root.platform = encoders, outputs, platform  # type: ignore[attr-defined]
    for name, mod in (("picamera2", root), ("picamera2.encoders", encoders), ("picamera2.outputs", outputs),
                      ("picamera2.platform", platform)):
        monkeypatch.setitem(__import__("sys").modules, name, mod)
    return root
