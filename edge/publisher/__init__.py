"""The publisher: alarms over the calibrated threshold go to a durable spool, then out on
ZeroMQ (``alarm/``, ``coverage/``, ``health/``), with a replay endpoint for anything missed.

- :mod:`.schema`: the messages, their JSON Schemas (shipped in this folder), builders, validator.
- :mod:`.spool`: the SQLite spool that allocates sequence numbers and holds every message.
- :mod:`.publish`: :class:`Publisher` (XPUB + replay ROUTER + heartbeats) and its config.
- :mod:`.replay`: the replay request and reply frames.
- :mod:`.subscriber`: :class:`Subscriber` (exactly once, in order) and ``edge subscribe``.
- :mod:`.keys`: CURVE key folders.
"""

from edge.publisher.publish import Publisher, PublisherConfig, PublisherError, ScoredCrop
from edge.publisher.schema import (
    ALARM_TOPIC,
    COVERAGE_TOPIC,
    HEALTH_TOPIC,
    CoverageGap,
    DefectHints,
    RunInfo,
    validate_message,
)
from edge.publisher.spool import Spool, SpoolError
from edge.publisher.subscriber import Message, Subscriber

__all__ = [
    "ALARM_TOPIC",
    "COVERAGE_TOPIC",
    "HEALTH_TOPIC",
    "CoverageGap",
    "DefectHints",
    "Message",
    "Publisher",
    "PublisherConfig",
    "PublisherError",
    "RunInfo",
    "ScoredCrop",
    "Spool",
    "SpoolError",
    "Subscriber",
    "validate_message",
]
