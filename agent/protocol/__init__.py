"""The footage-request protocol, pure: parsing, signatures, the decision, schedule, geometry, sealing.

Nothing in this package touches the disk, the network or the clock (the caller passes ``now``), so
the protocol's worked cases can be the acceptance test and an agency client can reuse it without
pulling in video or MQTT code. See ``docs/protocol.md``.
"""
