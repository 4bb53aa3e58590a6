"""Operations: metrics and health over HTTP, the live status page, webhook alerts.

Nothing here runs on the relay's hot path except :class:`relay.ops.metrics.FeedTracker`
(called once per batch). The HTTP endpoint and the alert sender run on threads of their own
and only read immutable :class:`relay.ops.metrics.OpsStatus` snapshots that the relay's
event loop takes every ``metrics.sample_interval`` seconds.
"""

from __future__ import annotations

__all__: list[str] = []
