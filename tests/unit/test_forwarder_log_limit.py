"""Per-connection warnings are limited per pod and reason: a pod that fails
every connection gives one line every LOG_EVERY seconds, and the next line
says how many were suppressed."""

from meshagent.forwarder.core import LOG_EVERY, LimitedLog


class FakeLogger:
    def __init__(self):
        self.lines = []

    def warning(self, message, extra=None):
        self.lines.append((message, extra))


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_one_line_per_pod_and_reason_then_the_count():
    logger, clock = FakeLogger(), Clock()
    limited = LimitedLog(logger, clock=clock)
    for n in range(100):
        limited.warning("a", "no_orig_dst", "no original destination; closing",
                        {"pod": "a", "conn": f"10.0.0.1:{n}", "reason": "no_orig_dst"})  # fmt: skip
    assert len(logger.lines) == 1
    assert logger.lines[0][1] == {"pod": "a", "conn": "10.0.0.1:0", "reason": "no_orig_dst"}
    # another pod, another reason: lines of their own
    limited.warning("b", "no_orig_dst", "m", {"pod": "b", "reason": "no_orig_dst"})
    limited.warning("a", "upstream:ECONNREFUSED", "m", {"pod": "a", "reason": "ECONNREFUSED"})
    assert len(logger.lines) == 3
    clock.now += LOG_EVERY
    limited.warning("a", "no_orig_dst", "no original destination; closing",
                    {"pod": "a", "conn": "10.0.0.1:7", "reason": "no_orig_dst"})  # fmt: skip
    assert len(logger.lines) == 4
    message, extra = logger.lines[-1]
    assert message == "no original destination; closing"
    assert extra["reason"] == "no_orig_dst (99 more since the last line)"
    assert extra["pod"] == "a" and extra["conn"] == "10.0.0.1:7"
    # the count starts again
    clock.now += LOG_EVERY
    limited.warning("a", "no_orig_dst", "m", {"pod": "a", "reason": "no_orig_dst"})
    assert logger.lines[-1][1]["reason"] == "no_orig_dst"
