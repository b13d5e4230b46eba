"""Geohash topics: the agent must subscribe to the cell its requests are published to."""

from __future__ import annotations

import random

import pytest
from paho.mqtt.client import topic_matches_sub

from agent.city.requests import request_topics
from agent.protocol.geohash import bounds, encode, request_topic, subscription_filter


def test_known_geohash() -> None:
    # The reference example from the geohash literature.
    assert encode(57.64911, 10.40744, 11) == "u4pruydqqvj"
    assert encode(57.64911, 10.40744, 0) == ""


def test_cells_contain_their_points() -> None:
    rng = random.Random(7)
    for _ in range(500):
        lat, lon = rng.uniform(-89.9, 89.9), rng.uniform(-179.9, 179.9)
        lat0, lat1, lon0, lon1 = bounds(encode(lat, lon, 5))
        assert lat0 <= lat <= lat1 and lon0 <= lon <= lon1


@pytest.mark.parametrize("precision", range(6))
def test_subscription_matches_the_topic_a_requester_uses(precision: int) -> None:
    home = (32.29876, -90.18481)
    filt = subscription_filter("civic/jackson-ms", *home, precision)
    assert filt.endswith("#") and "+" not in filt
    # A requester publishes to every precision-5 cell around an incident next door: one of them is ours.
    topics = request_topics("civic/jackson-ms", home[0] + 0.0005, home[1], 100)
    own = request_topic("civic/jackson-ms", encode(*home, 5))
    assert own in topics
    assert topic_matches_sub(filt, own)
    far_away = request_topic("civic/jackson-ms", encode(40.7128, -74.0060, 5))  # New York
    assert topic_matches_sub(filt, far_away) == (precision == 0)
    assert filt == "civic/jackson-ms/v1/requests/" + "".join(c + "/" for c in encode(*home, precision)) + "#"


def test_request_topic_needs_precision_5() -> None:
    with pytest.raises(ValueError):
        request_topic("civic/x", "9vx")
