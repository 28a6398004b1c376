"""The worker: queued jobs -> hash -> upload -> poll -> fetch -> place -> originals -> done.

``scheduler`` hands due steps to pools; ``steps`` run one step of one job and return an
outcome (``outcomes``); ``apply`` makes that outcome take effect; ``gates`` pause engine work
on bad credentials, a 402 or unwritable outputs; ``timing`` is the retry policy.
"""

from blurd.worker.checks import file_sha256, rejection
from blurd.worker.scheduler import Worker
from blurd.worker.timing import Timing, backoff

__all__ = ["Timing", "Worker", "backoff", "file_sha256", "rejection"]
