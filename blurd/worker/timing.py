"""The retry policy: delays, caps and bounds, as data. Tests pass a fast ``Timing``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from blurd import defaults


@dataclass(frozen=True)
class Timing:
    """Retry and polling delays, in seconds, and how many times a bounded failure may repeat."""

    backoff_base_s: float = defaults.BACKOFF_BASE_S
    backoff_cap_s: float = defaults.BACKOFF_CAP_S
    poll_first_s: float = defaults.POLL_FIRST_S
    poll_max_s: float = defaults.POLL_MAX_S
    poll_growth: float = defaults.POLL_GROWTH
    auth_retry_first_s: float = 30.0
    auth_retry_max_s: float = defaults.AUTH_RETRY_S
    payment_probe_s: float = defaults.PAYMENT_PROBE_S
    output_pause_s: float = defaults.OUTPUT_PAUSE_S
    idle_wait_max_s: float = 5.0
    queue_look_s: float = defaults.QUEUE_LOOK_S
    transfer_retries: int = defaults.TRANSFER_RETRIES


def backoff(
    attempt: int, timing: Timing, rng: Callable[[], float], retry_after: float | None
) -> float:
    """Exponential with jitter in [d/2, d], capped; never shorter than a Retry-After."""
    d: float = min(timing.backoff_cap_s, timing.backoff_base_s * 2.0 ** max(0, attempt - 1))
    delay = d / 2 + rng() * d / 2
    if retry_after is not None:
        delay = max(delay, min(retry_after, 3600.0))
    return delay


def poll_interval(
    polls: int, timing: Timing, engine_cap_s: float | None, rng: Callable[[], float]
) -> float:
    """The wait before poll number ``polls + 1`` of one job: growing, capped, jittered.

    Jitter only ever delays a poll: polling a job before its time finds it unfinished more
    often, and the next poll is then a whole (longer) interval away.
    """
    cap = min(timing.poll_max_s, engine_cap_s or timing.poll_max_s)
    interval = min(cap, timing.poll_first_s * timing.poll_growth ** max(0, polls - 1))
    return interval * (1.0 + 0.25 * rng())
