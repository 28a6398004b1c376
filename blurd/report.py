"""What `blurd status` and `blurd jobs` show: the read model, shaped for people and scripts."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from blurd import config as config_mod
from blurd.models import Job, JobState
from blurd.store import Store

DAEMON_STALE_S = 30.0  # a daemon state older than this belongs to a daemon that is gone


def status_data(cfg: config_mod.Config, store: Store) -> dict[str, Any]:
    """What `blurd status --json` prints (its shape is documented in the README)."""
    counts = store.counts()
    oldest = store.oldest_waiting()
    last = store.last_error()
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    uploaded = store.bytes_uploaded_since(midnight.timestamp())
    daemons = store.daemon_states(fresher_than_s=DAEMON_STALE_S)
    engine, why = cfg.engine_choice()
    # With several nodes on one database: this machine's daemon first, else any of them.
    live: dict[str, Any] = daemons.get(store.node) or next(iter(daemons.values()), {})
    engine_state = live.get("engine_state", {})
    worker_state = live.get("worker", {})
    return {
        "running": bool(daemons),
        "daemons": sorted(daemons),
        "engine": live.get("engine", engine),
        "engine_reason": live.get("engine_reason", why),
        "auth": _auth_state(engine_state, worker_state, running=bool(daemons)),
        "uploads_paused": bool(worker_state.get("uploads_paused", False)),
        "outputs_blocked": worker_state.get("outputs_blocked"),
        "originals_failing": int(worker_state.get("originals_failing", 0)),
        "limitations": live.get("limitations", []),
        "counts": {s.value: counts[s] for s in JobState},
        "oldest_waiting": job_brief(oldest),
        "last_error": job_brief(last),
        "uploaded_today_bytes": uploaded,
        "database": safe_url(cfg.daemon.database),
    }


def _auth_state(engine: dict[str, Any], worker: dict[str, Any], *, running: bool) -> str:
    if not running:
        return "unknown (daemon not running)"
    paused = str(worker.get("auth", ""))
    if paused.startswith("paused"):
        return paused
    return str(engine.get("auth", "not needed"))


def safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def job_dict(j: Job) -> dict[str, Any]:
    return {
        "id": j.id,
        "watch": j.watch,
        "path": j.rel_path,
        "state": j.state.value,
        "size": j.size,
        "sha256": j.sha256,
        "remote_id": j.remote_id,
        "node": j.node,
        "attempts": j.attempts,
        "error": j.error,
        "progress": j.progress,
        "output_media": j.output_media,
        "output_detections": j.output_detections,
        "created_at": _iso(j.created_at),
        "updated_at": _iso(j.updated_at),
    }


def job_brief(j: Job | None) -> dict[str, Any] | None:
    if j is None:
        return None
    return {"id": j.id, "path": j.rel_path, "state": j.state.value, "error": j.error,
            "created_at": _iso(j.created_at)}  # fmt: skip


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
