"""The agency side of the footage-request protocol: a worked, runnable example.

Use it as a library (``build_request``, ``open_delivery``, ``keygen``) or as
the ``doorbell-city`` command. Modules, one job each:

- :mod:`agent.city.keys`: signing keys and the public JWK Set residents import
- :mod:`agent.city.requests`: the request claims, the JWS, the geohash cells to publish to
- :mod:`agent.city.receive`: verifying and decrypting deliveries
- :mod:`agent.city.mqtt`: a blocking MQTT 5 session with timeouts
- :mod:`agent.city.cli`: the command line
"""

from agent.city.keys import KeygenResult, SigningKey, keygen, load_signing_key
from agent.city.receive import DeliveryRejected, OpenedDelivery, open_delivery
from agent.city.requests import BuiltRequest, build_request, cover_cells

__all__ = [
    "BuiltRequest",
    "DeliveryRejected",
    "KeygenResult",
    "OpenedDelivery",
    "SigningKey",
    "build_request",
    "cover_cells",
    "keygen",
    "load_signing_key",
    "open_delivery",
]
