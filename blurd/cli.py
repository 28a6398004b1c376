"""The command line: parses, calls the library, and alone turns errors into exit codes.

Exit codes: 0 ok; 1 other failure; 2 bad configuration; 3 credentials or API (``check``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blurd import __version__, logs
from blurd import config as config_mod
from blurd.errors import ApiError, AuthError, BlurdError, ConfigError, StoreError
from blurd.models import JobState
from blurd.report import job_dict, safe_url, status_data
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
    run.add_argument(
        "--detach",
        action="store_true",
        help="run in the background (for machines without systemd); needs --pidfile",
    )
    run.add_argument("--pidfile", metavar="FILE", help="with --detach: the locked pid file")
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

    db = sub.add_parser(
        "db",
        help="show or upgrade the database schema",
        description="Show the database's schema version, or upgrade it. A SQLite file is "
        "upgraded by `blurd run` itself; a shared (PostgreSQL) database only by `db upgrade`.",
    )
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    for name, text in (("version", "print the schema version; exit 1 if an upgrade is due"),
                       ("upgrade", "apply the pending migrations (run it from one node)")):
        with_config(db_sub.add_parser(name, help=text, description=text[0].upper() + text[1:]))

    anon = sub.add_parser(
        "anonymize",
        help="anonymize files now, without the daemon",
        description="Anonymize the given files now with the configured engine and the options "
        "of the first [[watch]] (or the defaults), showing progress.",
    )
    with_config(anon)
    anon.add_argument("files", nargs="+", metavar="FILE", type=Path, help="photos or videos")
    anon.add_argument(
        "-o", "--output", metavar="DIR", type=Path, default=Path("anonymized"),
        help="where the results go (default: ./anonymized)",
    )  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {
        "run": cmd_run,
        "status": cmd_status,
        "jobs": cmd_jobs,
        "retry": cmd_retry,
        "check": cmd_check,
        "db": cmd_db,
        "anonymize": cmd_anonymize,
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
    # Signal handlers first: a SIGTERM that arrives while the heavy modules below are still
    # being imported must stop the daemon, not be lost.
    from blurd.signals import Signals

    signals = Signals()
    signals.install()
    from blurd import daemon

    if args.detach and not args.pidfile:
        print("blurd run: --detach needs --pidfile FILE", file=sys.stderr)
        return EXIT_CONFIG
    cfg = _config(args)
    if args.inbox:
        # Folders named on the command line are created; configured watch folders are not
        # (a missing one may be an unmounted share, which blurd waits for).
        Path(args.inbox).mkdir(parents=True, exist_ok=True)

    def reload_config() -> config_mod.Config:
        return _config(args)

    if args.detach:
        from blurd import detach

        # The database is opened (and its schema checked) once before detaching, so that a
        # refusal reaches the shell that ran the command, not only the log.
        _store(cfg).close()
        return detach.run_detached(
            cfg, signals, Path(args.pidfile), reload_config=reload_config, verbose=args.verbose
        )
    logs.configure(sys.stdout, verbose=args.verbose)
    return daemon.run(cfg, once=args.once, signals=signals, reload_config=reload_config)


def _store(cfg: config_mod.Config) -> Store:
    return Store(cfg.daemon.database, node=cfg.daemon.node_id)


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _config(args, require_watches=False)
    store = _store(cfg)
    try:
        data = status_data(cfg, store)
    finally:
        store.close()
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    running = "running (" + ", ".join(data["daemons"]) + ")" if data["running"] else "not running"
    print(f"daemon:   {running}")
    print(f"engine:   {data['engine']} ({data['engine_reason']})")
    print(
        f"auth:     {data['auth']}" + ("; uploads paused (402)" if data["uploads_paused"] else "")
    )
    for sentence in data["limitations"]:
        print(f"limited:  {sentence}")
    print("jobs:     " + ", ".join(f"{k} {v}" for k, v in data["counts"].items()))
    oldest, last = data["oldest_waiting"], data["last_error"]
    if oldest:
        print(f"oldest:   #{oldest['id']} {oldest['path']} ({oldest['state']}, since "
              f"{oldest['created_at']})")  # fmt: skip
    if last:
        print(f"last error: #{last['id']} {last['path']}: {last['error']}")
    if data["outputs_blocked"]:
        print(f"outputs:  cannot be written, new uploads wait: {data['outputs_blocked']}")
    if data["originals_failing"]:
        print(f"originals: {data['originals_failing']} job(s) could not move or delete their "
              "original; retried (see `blurd jobs --state downloading`)")  # fmt: skip
    print(f"uploaded today: {data['uploaded_today_bytes'] / 1e6:.1f} MB")
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
        print(json.dumps([job_dict(j) for j in rows], indent=2))
        return EXIT_OK
    shared = any(j.node and j.node != store.node for j in rows)
    for j in rows:
        extra = j.progress or j.error or j.output_media or ""
        node = f"{j.node or '-':<12}  " if shared else ""  # several nodes: which one holds it
        print(f"{j.id:>6}  {j.state.value:<11}  {node}{j.rel_path}  {extra}")
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


def cmd_db(args: argparse.Namespace) -> int:
    from sqlalchemy import create_engine

    from blurd import migrations
    from blurd.models import SCHEMA_VERSION

    cfg = _config(args, require_watches=False)
    url = cfg.daemon.database
    if args.db_command == "upgrade":
        store = Store(url, upgrade=True)
        store.close()
        if store.schema_change is None:
            print(f"the database is at schema version {SCHEMA_VERSION}: nothing to do")
        else:
            before, after = store.schema_change
            print(f"the database went from schema version {before or 'none'} to {after}")
        return EXIT_OK
    name = "daemon.database"  # until the URL is known to parse: never print a password
    try:
        name = safe_url(url)
        # The driver the store uses (psycopg 3), not SQLAlchemy's default for postgresql://.
        engine = create_engine(re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", url))
        try:
            with engine.connect() as conn:
                version = migrations.current_version(conn)
        finally:
            engine.dispose()
    except Exception as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise StoreError(f"{name}: cannot read the schema version: {reason}") from exc
    print(f"schema version {version or 'none'} (this blurd: {SCHEMA_VERSION})")
    return EXIT_OK if version == SCHEMA_VERSION else EXIT_FAIL


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


def cmd_anonymize(args: argparse.Namespace) -> int:
    from blurd import daemon, oneshot
    from blurd.options import Options

    cfg = _config(args, require_watches=False)
    options = cfg.watches[0].options if cfg.watches else Options()
    engine = daemon.make_engine(cfg)
    progress = _BarProgress(len(args.files))
    try:
        outcomes = oneshot.anonymize(args.files, args.output, engine, options, progress=progress)
    finally:
        progress.close()
        engine.close()
    failed = [o for o in outcomes if o.error]
    for o in outcomes:
        if o.error:
            print(f"failed: {o.source}: {o.error}", file=sys.stderr)
        else:
            print(f"ok: {o.source} -> {o.output}")
    return EXIT_FAIL if failed else EXIT_OK


class _BarProgress:
    """A tqdm bar over the files, its text saying what the current one is doing."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="file", file=sys.stderr, dynamic_ncols=True)

    def step(self, source: Path, what: str) -> None:
        self.bar.set_description(f"{source.name}: {what}")

    def done(self, outcome: Any) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
