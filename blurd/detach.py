"""`blurd run --detach --pidfile F`: the daemon in the background, for machines without systemd.

python-daemon does the detaching; its default SIGTERM handler (which raises SystemExit from
wherever the process is) is replaced by blurd's own, which only sets the stop event. The pid
file is locked while blurd runs and removed when it exits; a stale one, left by a process that
no longer exists, is removed first.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import daemon as python_daemon
from daemon.pidfile import TimeoutPIDLockFile

from blurd import logs
from blurd.config import Config
from blurd.daemon import run
from blurd.errors import BlurdError
from blurd.signals import Signals

PIDFILE_UMASK = 0o027


def log_file_for(config: Config) -> Path:
    """`daemon.log_file`, else blurd.log beside the SQLite database, else in the state folder."""
    if config.daemon.log_file:
        return Path(config.daemon.log_file).expanduser()
    db = config.daemon.database
    if db.startswith("sqlite:///"):
        return Path(db.removeprefix("sqlite:///")).parent / "blurd.log"
    return Path(os.environ.get("XDG_STATE_HOME", "~/.local/state")).expanduser() / "blurd.log"


def _remove_stale(pidfile: Path) -> None:
    try:
        pid = int(pidfile.read_text().strip() or "0")
    except FileNotFoundError:
        return
    except ValueError:
        pid = 0
    if pid > 0:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            pass
        except PermissionError:
            raise BlurdError(f"{pidfile}: blurd is already running as pid {pid}") from None
        else:
            raise BlurdError(f"{pidfile}: blurd is already running as pid {pid}")
    pidfile.unlink(missing_ok=True)


def run_detached(
    config: Config,
    signals: Signals,
    pidfile: Path,
    *,
    reload_config: Callable[[], Config],
    verbose: bool = False,
) -> int:
    """Detach, then run the daemon; returns its exit code (in the detached process)."""
    pidfile = pidfile.absolute()
    _remove_stale(pidfile)
    log_path = log_file_for(config)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    context = python_daemon.DaemonContext(
        pidfile=TimeoutPIDLockFile(str(pidfile), acquire_timeout=0),
        umask=PIDFILE_UMASK,
        working_directory="/",
        signal_map={
            **signals.signal_map(),
            signal.SIGTSTP: None,
            signal.SIGTTIN: None,
            signal.SIGTTOU: None,
        },
    )
    with context, open(log_path, "a", buffering=1) as log_stream:
        logs.configure(log_stream, json=True, verbose=verbose)
        return run(config, signals=signals, reload_config=reload_config)
