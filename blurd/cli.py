"""The command line: parses, calls the library, and alone turns errors into exit codes.

Exit codes: 0 ok; 1 other failure; 2 bad configuration; 3 credentials or API (``check``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from blurd import __version__, logs
from blurd import config as config_mod
from blurd.errors import ApiError, AuthError, BlurdError, ConfigError, StoreError
from blurd.models import Job, JobState
from blurd.store import Store

EXIT_OK, EXIT_FAIL, EXIT_CONFIG, EXIT_API = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blurd",
        description="Anonymize (blur faces and licence plates in) the photos and videos "
        "dropped into watched folders.",
    )
    p.add_argument("--version", action="version", version=f"blurd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--config",
            metavar="FILE",
            help="config file (default: $BLURD_CONFIG, then /etc/blurd/config.toml)",
        )

    run = sub.add_parser("run", help="run the daemon", description="Run the daemon.")
    with_config(run)
    run.add_argument("--inbox", metavar="DIR", help="watch this folder (no config file needed)")
    run.add_argument("--outbox", metavar="DIR", help="write anonymized files here")
    run.add_argument(
        "--once", action="store_true", help="process what is there, exit when the queue is empty"
    )
    run.add_argument("--verbose", action="store_true", help="debug logging")

    status = sub.add_parser(
        "status",
        help="engine, counts per state, oldest waiting job, last error",
        description="Show the engine, the job counts per state, the oldest waiting job and "
        "the last error.",
    )
    with_config(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")

    jobs = sub.add_parser("jobs", help="list jobs", description="List jobs, newest first.")
    with_config(jobs)
    jobs.add_argument("--state", choices=[s.value for s in JobState], help="only this state")
    jobs.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    jobs.add_argument("--json", action="store_true", help="machine-readable output")

    retry = sub.add_parser(
        "retry", help="put failed jobs back in the queue", description="Requeue failed jobs."
    )
    with_config(retry)
    retry.add_argument("ids", nargs="*", type=int, metavar="ID", help="job ids")
    retry.add_argument("--failed", action="store_true", help="every failed job")

    check = sub.add_parser(
        "check",
        help="validate the config and log in once",
        description="Validate the configuration, paths and permissions, and log in once.",
    )
    with_config(check)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {
        "run": cmd_run,
        "status": cmd_status,
        "jobs": cmd_jobs,
        "retry": cmd_retry,
        "check": cmd_check,
    }[args.command]
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"blurd: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StoreError as exc:
        print(f"blurd: database error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except BlurdError as exc:
        print(f"blurd: {exc}", file=sys.stderr)
        return EXIT_FAIL


def _config(args: argparse.Namespace, *, require_watches: bool = True) -> config_mod.Config:
    path = config_mod.find_config_file(getattr(args, "config", None), os.environ)
    return config_mod.load(
        path,
        os.environ,
        inbox=getattr(args, "inbox", None),
        outbox=getattr(args, "outbox", None),
        require_watches=require_watches,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from blurd import daemon  # the daemon's imports are heavy; other commands do not need them

    logs.configure(sys.stdout, verbose=args.verbose)
    cfg = _config(args)
    return daemon.run(cfg, once=args.once)


def _store(cfg: config_mod.Config) -> Store:
    return Store(cfg.daemon.database)


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _config(args, require_watches=False)
    store = _store(cfg)
    try:
        counts = store.counts()
        oldest = store.oldest_waiting()
        last = store.last_error()
        midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        uploaded = store.bytes_uploaded_since(midnight.timestamp())
    finally:
        store.close()
    engine, why = cfg.engine_choice()
    data: dict[str, Any] = {
        "engine": engine,
        "engine_reason": why,
        "database": cfg.daemon.database,
        "counts": {s.value: counts[s] for s in JobState},
        "oldest_waiting": _job_brief(oldest),
        "last_error": _job_brief(last),
        "uploaded_today_bytes": uploaded,
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print(f"engine:   {engine} ({why})")
    print("jobs:     " + ", ".join(f"{k} {v}" for k, v in data["counts"].items()))
    if oldest:
        print(f"oldest:   #{oldest.id} {oldest.rel_path} ({oldest.state}, {_age(oldest)})")
    if last:
        print(f"last error: #{last.id} {last.rel_path}: {last.error}")
    print(f"uploaded today: {uploaded / 1e6:.1f} MB")
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    cfg = _config(args, require_watches=False)
    store = _store(cfg)
    try:
        state = JobState(args.state) if args.state else None
        rows = store.list_jobs(state, args.limit)
    finally:
        store.close()
    if args.json:
        print(json.dumps([_job_dict(j) for j in rows], indent=2))
        return EXIT_OK
    for j in rows:
        extra = j.progress or j.error or j.output_media or ""
        print(f"{j.id:>6}  {j.state.value:<11}  {j.rel_path}  {extra}")
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    if not args.ids and not args.failed:
        print("blurd retry: give job ids or --failed", file=sys.stderr)
        return EXIT_CONFIG
    cfg = _config(args, require_watches=False)
    store = _store(cfg)
    try:
        n = store.retry(None if args.failed else args.ids)
    finally:
        store.close()
    print(f"{n} job(s) back in the queue")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from blurd import daemon

    cfg = _config(args)
    for warning in cfg.warnings:
        print(f"warning: {warning}")
    for w in cfg.watches:
        for folder, what in ((w.path, "watch folder"), (w.output, "output folder")):
            if not folder.is_dir():
                print(f"warning: {what} {folder} does not exist (yet)")
            elif not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
                raise ConfigError(f"{folder} is not readable and writable", key=what)
    store = _store(cfg)
    store.close()
    engine = daemon.make_engine(cfg)
    name, why = cfg.engine_choice()
    try:
        engine.check()
    except (AuthError, ApiError) as exc:
        print(f"blurd check: engine {name}: {exc}", file=sys.stderr)
        return EXIT_API
    finally:
        engine.close()
    print(f"ok: engine {name} ({why}); {len(cfg.watches)} watch folder(s)")
    return EXIT_OK


def _job_dict(j: Job) -> dict[str, Any]:
    return {
        "id": j.id,
        "watch": j.watch,
        "path": j.rel_path,
        "state": j.state.value,
        "size": j.size,
        "sha256": j.sha256,
        "remote_id": j.remote_id,
        "attempts": j.attempts,
        "error": j.error,
        "progress": j.progress,
        "output_media": j.output_media,
        "output_detections": j.output_detections,
        "created_at": _iso(j.created_at),
        "updated_at": _iso(j.updated_at),
    }


def _job_brief(j: Job | None) -> dict[str, Any] | None:
    if j is None:
        return None
    return {"id": j.id, "path": j.rel_path, "state": j.state.value, "error": j.error,
            "created_at": _iso(j.created_at)}  # fmt: skip


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _age(j: Job) -> str:
    s = int(time.time() - j.created_at)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
