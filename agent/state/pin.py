"""The device key's thumbprint, pinned in a file beside the database and never inside it.

Why: the access log's checkpoints are only as good as the key they are checked against. The key
written inside a checkpoint proves nothing (anyone who can write the database can sign their own
checkpoints with a key of their own), and ``device-key.pem`` can be deleted or replaced. So the
thumbprint is written once, when the agent first uses its key, to ``<data_dir>/device-key.thumbprint``
(one line, 0644, never rewritten by the agent), shown by ``doorbell-agent status``, and checked
by ``doorbell-agent log verify``. The same thumbprint is the ``kid`` of every delivery manifest, so
agencies hold copies of it too, and an auditor can give it with ``log verify --device-key``.

The pin stops the quiet swap of keys. It does not stop someone who can rewrite every file on the
device; what stops them are the copies kept elsewhere (the thumbprint the homeowner noted, the
manifests agencies hold, bundles exported earlier). README.md says which is which.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import UserError
from agent.fsutil import write_atomically
from agent.state.logverify import is_thumbprint

PIN_FILE_NAME = "device-key.thumbprint"
MAX_PIN_BYTES = 256


class PinError(UserError):
    """The pin is unreadable or disagrees with the device key: nothing is signed until a person decides."""


def pin_path(data_dir: Path) -> Path:
    return Path(data_dir) / PIN_FILE_NAME


def read_pin(path: Path) -> str | None:
    """The pinned thumbprint, or None if no pin was written yet; :class:`PinError` if the file is not a pin."""
    try:
        data = path.read_bytes()[: MAX_PIN_BYTES + 1]
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PinError(f"the device-key pin {path} cannot be read ({exc.strerror or exc}); run as the agent's user or with sudo") from None
    text = data.decode("ascii", "replace").strip()
    if len(data) > MAX_PIN_BYTES or not is_thumbprint(text):
        raise PinError(
            f"the device-key pin {path} does not hold a thumbprint (43 characters of base64url on one line); "
            "restore it from a backup or from a manifest's kid, or delete it to pin the current key again"
        )
    return text


def ensure_pin(path: Path, kid: str) -> str:
    """Pin ``kid`` if nothing is pinned yet; refuse (:class:`PinError`) if another key is pinned.

    Called with the key about to sign (the service at start-up, the log commands that sign), so
    every signature the log holds is by the pinned key. Created once (never replaced: two processes
    racing both end up with the first pin), 0644 so that ``status`` shows it to anyone.
    """
    pinned = read_pin(path)
    if pinned is None:
        write_atomically(path, (kid + "\n").encode("ascii"), 0o644, replace=False)
        pinned = read_pin(path)
    if pinned != kid:
        raise PinError(
            f"the device key (thumbprint {kid}) is not the pinned one ({pinned}, in {path}): device-key.pem was replaced "
            "or the pin edited. Nothing is signed or shared with it. Restore the original device-key.pem from your backup; "
            "if it is lost for good, see README.md, 'If the device key is lost'"
        )
    return kid


@dataclass(frozen=True)
class DeviceIdentity:
    """What ``status`` shows about the device key: the pin, the key file, and whether they agree."""

    pinned: str | None
    key_file: str | None
    problem: str | None

    def to_json(self) -> dict[str, Any]:
        return {"thumbprint": self.pinned, "key_file_thumbprint": self.key_file, "problem": self.problem}


def device_identity(data_dir: Path, key_file: Path) -> DeviceIdentity:
    """The pinned thumbprint and the key file's, for displays; never raises."""
    from agent.state.devicekey import DeviceKey, DeviceKeyError  # only here: displays need not load keys otherwise

    problem = None
    try:
        pinned = read_pin(pin_path(data_dir))
    except PinError as exc:
        pinned, problem = None, str(exc)
    key_kid = None
    if key_file.exists():
        try:
            key_kid = DeviceKey.load(key_file).kid
        except DeviceKeyError as exc:
            problem = problem or str(exc)
    elif pinned is not None:
        problem = f"the device key {key_file} is missing: nothing can be signed or shared until it is restored"
    if problem is None and pinned is not None and key_kid is not None and pinned != key_kid:
        problem = (f"the device key file {key_file} (thumbprint {key_kid}) is not the pinned key ({pinned}): "
                   "it was replaced; restore the original from your backup")
    return DeviceIdentity(pinned, key_kid, problem)


def signing_key(data_dir: Path, key_file: Path) -> tuple[Any, str | None]:
    """``(DeviceKey, None)`` if the device key can be read and is the pinned one (pinning it if nothing is
    pinned yet), else ``(None, why)``: for commands that sign the log (a checkpoint, an export, a change)."""
    from agent.state.devicekey import DeviceKey, DeviceKeyError

    if not key_file.exists():
        return None, f"there is no device key at {key_file} (the sharing service makes it when it first starts)"
    try:
        key = DeviceKey.load(key_file)
        ensure_pin(pin_path(data_dir), key.kid)
    except (DeviceKeyError, PinError) as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"cannot pin the device key in {data_dir} ({exc.strerror or exc}); run as the agent's user"
    return key, None
