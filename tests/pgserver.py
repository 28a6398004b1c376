"""A throw-away PostgreSQL server on 127.0.0.1, for the scale-out tests and benchmark.

PostgreSQL refuses to run as root, and CI runs as root: there the server runs as the
`postgres` user that Debian's package creates. Its data folder is a new temporary folder,
removed when the server stops. ``durable=False`` turns fsync off (tests); the benchmark keeps
the defaults.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

SUPERUSER = "blurd"


def _bindir() -> Path:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    # The newest major version: "15" after "9.6", so by number, not by text.
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major_version)
    if not candidates:
        raise RuntimeError(
            "PostgreSQL is not installed (no initdb): install Debian's `postgresql` package; "
            "scripts/test does this when it runs as root"
        )
    return Path(candidates[-1]).parent


def _major_version(initdb: str) -> tuple[int, ...]:
    version = Path(initdb).parent.parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    def __init__(self, *, durable: bool = False) -> None:
        self.bindir = _bindir()
        self.durable = durable
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="blurd-pg-"))
        self.data = self.dir / "data"
        self._proc: subprocess.Popen[bytes] | None = None
        self._runas: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._runas = ["runuser", "-u", "postgres", "--"]
        self._n = 0

    def _run(self, *cmd: str) -> None:
        subprocess.run([*self._runas, *cmd], check=True, capture_output=True, timeout=120)

    def start(self) -> PostgresServer:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
                  "-A", "trust", "--no-sync", "-E", "UTF8",
                  "--locale=C")  # fmt: skip  # the C locale exists on every machine
        try:
            self.resume()
        except RuntimeError:
            self.stop()
            raise
        return self

    def dsn(self, db: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={db}"

    def url(self, db: str) -> str:
        """The SQLAlchemy URL blurd's config takes."""
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{db}"

    def new_database(self) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        self._n += 1
        name = f"t{self._n}_{os.getpid()}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            # runuser does not pass signals on: signal the postmaster itself ("fast" shutdown).
            try:
                pid = int((self.data / "postmaster.pid").read_text().split()[0])
                os.kill(pid, signal.SIGINT)
            except (OSError, ValueError, IndexError):
                self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def halt(self) -> None:
        """Stop the server ("fast" shutdown) but keep its data folder: ``resume`` starts it
        again on the same port, as an outage of the database server would look."""
        if self._proc is None or self._proc.poll() is not None:
            return
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGINT)
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def resume(self) -> None:
        """Start the server on its data folder and port: after ``initdb``, or again after
        ``halt``."""
        opts = ["-c", "listen_addresses=127.0.0.1", "-p", str(self.port), "-c",
                f"unix_socket_directories={self.dir}", "-c", "max_connections=200"]  # fmt: skip
        if not self.durable:
            opts += ["-c", "fsync=off", "-c", "synchronous_commit=off",
                     "-c", "full_page_writes=off"]  # fmt: skip
        with open(self.dir / "server.log", "ab") as log:
            self._proc = subprocess.Popen(
                [*self._runas, str(self.bindir / "postgres"), "-D", str(self.data), *opts],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(self.dsn("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    tail = (self.dir / "server.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"PostgreSQL did not start:\n{tail}") from None
                time.sleep(0.1)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
