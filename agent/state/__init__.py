"""The agent's durable state: what must survive a power cut and what the resident relies on.

Replay memory, the access log (writer and the auditor's verifier), approvals, the kill switch, the
trust store file, the device key and the clock check, over one SQLite helper (:mod:`agent.state.db`).
"""
