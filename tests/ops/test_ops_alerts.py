"""Webhook alerts against a real local HTTP server."""

from __future__ import annotations

import threading
from typing import List

from ops_helpers import WebhookServer, down_url, wait_for

from relay.ops.alerts import Alert, AlertSender, Webhook, render_template


def _alert(event: str = "feed_lost", text: str = "feed lost: source is not connected") -> Alert:
    return Alert(event, text, "run1", "qmt", 1733118954.0, {"seq": 7})


def test_generic_body_carries_event_text_run_source_time_details() -> None:
    """A plain URL webhook receives the generic JSON body."""
    with WebhookServer() as server:
        sender = AlertSender([Webhook(server.url)], host="box1")
        sender.start()
        try:
            assert sender.notify(_alert())
            wait_for(lambda: server.bodies, "alert not delivered")
        finally:
            sender.close()
    assert [{"event": "feed_lost", "text": "feed lost: source is not connected",
             "run_id": "run1", "source": "qmt", "time": "2024-12-02T13:55:54+08:00",
             "host": "box1", "details": {"seq": 7}}] == server.bodies
    assert 1 == sender.sent


def test_template_renders_a_dingtalk_body() -> None:
    """A template's placeholders are filled in every string; JSON stays valid."""
    template = {"msgtype": "text", "text": {"content": "qmt-relay $event: ${text} ($details)"}}
    with WebhookServer() as server:
        sender = AlertSender([Webhook(server.url, template)], host="box1")
        sender.start()
        try:
            sender.notify(_alert(text='quote "x" \\ y'))
            wait_for(lambda: server.bodies, "alert not delivered")
        finally:
            sender.close()
    assert [{"msgtype": "text", "text": {
        "content": 'qmt-relay feed_lost: quote "x" \\ y ({"seq": 7})'}}] == server.bodies


def test_render_template_leaves_unknown_and_lone_dollars() -> None:
    """Unknown names and lone dollar signs pass through; numbers and keys are handled."""
    assert {"$event": ["a $nope 5$", 3, None]} == render_template(
        {"$event": ["a $nope 5$", 3, None]}, {"text": "t"})
    assert {"x": "feed_lost"} == render_template({"$event": "x"} and {"x": "$event"},
                                                 {"event": "feed_lost"})


def test_failed_posts_are_retried_with_backoff() -> None:
    """Two 500 answers, then success: delivered once, after two retries."""
    with WebhookServer(fail_first=2) as server:
        sender = AlertSender([Webhook(server.url)], retries=3, backoff=0.01)
        sender.start()
        try:
            sender.notify(_alert())
            wait_for(lambda: server.bodies, "alert not delivered after retries")
        finally:
            sender.close()
    assert 3 == server.requests
    assert ["feed_lost"] == server.events()
    assert (1, 0) == (sender.sent, sender.failed)


def test_a_down_webhook_fails_after_its_retries_and_never_blocks_notify() -> None:
    """Connection refused: counted as failed after the retries; notify returned at once."""
    sender = AlertSender([Webhook(down_url())], retries=2, backoff=0.01)
    sender.start()
    try:
        assert sender.notify(_alert())
        wait_for(lambda: sender.failed, "failure not counted")
    finally:
        sender.close()
    assert (0, 1) == (sender.sent, sender.failed)


def test_rate_limit_bounds_a_flapping_feed_and_reports_suppressed() -> None:
    """Ten losses in one window send three; the next allowed one says seven were suppressed."""
    now: List[float] = [1000.0]
    with WebhookServer() as server:
        sender = AlertSender([Webhook(server.url)], rate_limit=3, rate_window=60.0,
                             clock=lambda: now[0])
        sender.start()
        try:
            queued = [sender.notify(_alert()) for _ in range(10)]
            assert sender.notify(_alert("feed_recovered", "feed recovered"))  # other kind
            now[0] += 61.0
            assert sender.notify(_alert())
            wait_for(lambda: len(server.bodies) == 5, "alerts not delivered")
        finally:
            sender.close()
    assert [True] * 3 + [False] * 7 == queued
    assert 7 == sender.suppressed
    last = [b for b in server.bodies if b["event"] == "feed_lost"][-1]
    assert 7 == last["details"]["suppressed"]
    assert last["text"].endswith("(7 similar alerts suppressed)")


def test_a_slow_webhook_delays_neither_notify_nor_the_other_webhook() -> None:
    """One robot hangs; the other still receives every alert and notify never waits."""
    gate = threading.Event()
    with WebhookServer(gate=gate) as slow, WebhookServer() as fast:
        sender = AlertSender([Webhook(slow.url), Webhook(fast.url)], timeout=10.0)
        sender.start()
        try:
            for event in ("feed_lost", "feed_recovered", "feed_lost"):
                assert sender.notify(_alert(event))
            wait_for(lambda: len(fast.bodies) == 3, "fast webhook starved by the slow one")
            assert 1 == slow.waiting
        finally:
            gate.set()
            sender.close()
    assert ["feed_lost", "feed_recovered", "feed_lost"] == fast.events()


def test_full_queue_drops_and_counts() -> None:
    """A webhook that cannot keep up: alerts beyond its queue are dropped and counted."""
    gate = threading.Event()
    with WebhookServer(gate=gate) as slow:
        sender = AlertSender([Webhook(slow.url)], queue_size=2, rate_limit=100)
        sender.start()
        try:
            sender.notify(_alert())
            wait_for(lambda: slow.waiting, "first alert never reached the server")
            results = [sender.notify(_alert()) for _ in range(4)]
        finally:
            gate.set()
            sender.close()
    assert [True, True, False, False] == results
    assert 2 == sender.dropped
