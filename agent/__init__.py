"""doorbell-agent: footage stays on the resident's device unless a signed,
consented, geofenced request asks for exact minutes of it."""

__version__ = "0.1.0"
