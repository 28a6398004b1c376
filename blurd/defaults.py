"""Named defaults, each with its unit in its name."""

from __future__ import annotations

BLURIT_URL = "https://api.services.wassa.io"

# daemon
MAX_UPLOADS = 2
MAX_IN_FLIGHT = 32
RESCAN_INTERVAL_S = 300.0
LOOP_TICK_S = 0.5
RETENTION_DAYS = 90.0  # finished jobs older than this are pruned (what reuse needs is kept)
PRUNE_EVERY_S = 3600.0
LEASE_S = 120.0  # a node holds its jobs this long without renewing; renewed every quarter
TWIN_WAIT_S = 5.0  # a job whose identical twin is in flight looks again this much later
NODE_STATE_FRESH_S = 15.0  # a daemon_state row younger than this is a running daemon
TICK_BATCH_S = 0.02  # after a wake-up, the worker's scheduler waits this long for more
# Without news of the queue (a watcher's, or a job this node put back), the scheduler looks at
# it this often: other nodes' jobs and `blurd retry` send none.
QUEUE_LOOK_S = 1.0

# watch
SETTLE_S = 5.0
STABILITY_CHECK_S = 0.5
EVENT_BATCH_S = 0.05  # after a watchdog event, wait this long for more before a tick

# BlurIt HTTP
TOKEN_LIFETIME_DEFAULT_S = 3600.0
# A token is refreshed ahead of its expiry by 20 % of its lifetime, but never more than 300 s
# ahead: a 3600 s token after 3300 s, a 3 s token after 2.4 s.
TOKEN_REFRESH_AT_FRACTION = 0.8
TOKEN_REFRESH_MARGIN_MAX_S = 300.0
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
UPLOAD_READ_TIMEOUT_S = 600.0
DOWNLOAD_CHUNK_BYTES = 1024 * 1024
SMALL_UPLOAD_BYTES = 1024 * 1024  # uploads up to this size are sent from one buffer

# retries and polling
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 300.0
POLL_FIRST_S = 1.0
POLL_MAX_S = 45.0
POLL_GROWTH = 1.5
AUTH_RETRY_S = 300.0  # login retried this often while credentials are wrong
PAYMENT_PROBE_S = 30.0  # a 402 pause probes again this often
UNKNOWN_JOB_MAX_REQUEUES = 3
REFUSED_MAX_ATTEMPTS = 4  # a job answered 403 this many times in a row fails
BAD_RESULT_MAX_ATTEMPTS = 5  # a 2xx body that is not what was due, this many times: failed
# Submits that may each have created a job at the API (timeout after the body was sent, 502,
# 504, a 2xx reply without a job id): at most this many, each logged as a possible double charge.
POSSIBLY_SUBMITTED_MAX = 3
TRANSFER_RETRIES = 2  # a broken download is fetched again at once this often, then backs off
OUTPUT_PAUSE_S = 30.0  # uploads pause this long after an output could not be written
DATABASE_RETRY_MAX_S = 5.0  # while the database is away, a step's outcome is retried this often
UNSEEN_STATUS_MAX_POLLS = 100

# input
MAX_INPUT_BYTES = 8 * 1024**3
SUPPORTED_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".mp4", ".avi", ".mov", ".mkv", ".zip"}
)

# writer
TEMP_PREFIX = ".blurd-"
