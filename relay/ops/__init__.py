"""Operations: how the relay is run and watched.

``service.py`` is the Windows service shell (pywin32, imported only on Windows); beside it,
``monitor.py`` (the relay's operations side: snapshots, health, alerts), ``metrics.py``
(Prometheus registry per relay), ``http.py`` (/metrics, /healthz, /status and the page on a
thread of its own), ``alerts.py`` (webhooks) and ``status.py`` (``qmt-relay status``).
Nothing here is on the hot path except one call per batch into
:class:`relay.ops.metrics.FeedTracker`; the pipeline stages never import this package.
"""
