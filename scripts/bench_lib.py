"""Shared code of ``scripts/bench``: child processes, the test API server, blurd as a process,
the bare HTTP client, and the memory probes.

Some parts run in child processes, started as ``python scripts/bench_lib.py MODE …``:

``serve``      the test API server (``tests/fakeblurit.py``'s CLI) with TCP_NODELAY;
``daemon``     blurd's daemon (``blurd.daemon.run``) with a chosen first-poll delay; the rest
               of its timing is blurd's production ``Timing``;
``bare``       the bare client of the overhead figure (same HTTP calls, same concurrency);
``mem-blurd``  a 1 GiB round trip through ``BlurItEngine``; prints its peak RSS;
``mem-plain``  the same upload done the usual way, ``requests.post(files=...)``; peak RSS.

Every child is started through a tiny launcher that asks the kernel to signal it when the
bench dies (``PR_SET_PDEATHSIG``), so no child outlives the bench, even after a ``kill -9``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import mimetypes
import os
import queue
import re
import resource
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PY = sys.executable
CLIENT_ID, SECRET_ID = "client_test", "secret_test"
JOB_PATH = "/innovation-service/anonymization"
HTTP_TIMEOUT_S = (10.0, 600.0)

# prctl(PR_SET_PDEATHSIG, sig), then exec the real command: the child gets `sig` when the
# bench's main thread goes away, however it goes. SIGINT is reset to its default first: a
# shell starting the bench in the background ignores it, and Python then never turns it
# into KeyboardInterrupt.
_LAUNCHER = (
    "import ctypes, os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "ctypes.CDLL(None).prctl(1, int(sys.argv[1])); os.execv(sys.argv[2], sys.argv[2:])"
)

_children: list[subprocess.Popen[bytes]] = []
_stop_signals: dict[int, int] = {}  # pid -> the signal that stops it cleanly


def spawn(
    cmd: Sequence[str], *, death_signal: int = signal.SIGTERM, **kw: Any
) -> subprocess.Popen[bytes]:
    """Start a child that dies with the bench (call from the main thread only).

    ``death_signal`` is what it gets if the bench dies, and what ``stop_all`` sends it.
    """
    full = [PY, "-c", _LAUNCHER, str(int(death_signal)), *cmd]
    proc = subprocess.Popen(full, **kw)
    _children.append(proc)
    _stop_signals[proc.pid] = int(death_signal)
    return proc


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
    """Signal one child, wait (bounded), kill it if it is still there. Returns its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10)
    with contextlib.suppress(ValueError):
        _children.remove(proc)
    return int(proc.returncode)


def stop_all() -> None:
    """Every child still running: its clean-stop signal, then SIGKILL."""
    for proc in list(_children):
        stop(proc, _stop_signals.get(proc.pid, signal.SIGTERM), timeout=10)


# ------------------------------------------------------------------ the test API server


def patch_nodelay() -> None:
    """Make the test API server answer without Nagle's 40 ms stall, as real servers do.

    ``http.server`` writes a reply's headers and its body in two ``send`` calls and leaves
    Nagle's algorithm on, so the body waits for the client's delayed ACK: about 40 ms per
    request on Linux loopback. Real HTTP servers set TCP_NODELAY; here it is set on each
    accepted connection. ``scripts/bench --stock-server`` runs without this.
    """
    import socket

    from tests import fakeblurit

    handler = fakeblurit._Handler
    if getattr(handler, "_bench_nodelay", False):
        return
    setup = handler.setup

    def setup_nodelay(self: Any) -> None:
        setup(self)
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    handler.setup = setup_nodelay  # type: ignore[method-assign]
    handler._bench_nodelay = True  # type: ignore[attr-defined]


STOCK_SERVER = False  # set by scripts/bench --stock-server


class FakeServer:
    """``tests/fakeblurit.py`` in its own process, so its CPU and memory are not blurd's."""

    def __init__(self, job_seconds: float, tmp: Path, *, echo: bool = False) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TMPDIR": str(tmp)}  # its upload spools live in our temp dir
        if STOCK_SERVER:
            cmd = [PY, str(REPO / "tests" / "fakeblurit.py")]
        else:
            cmd = [PY, str(Path(__file__).resolve()), "serve"]
        self.proc = spawn(
            [*cmd, "--port", "0", "--job-seconds", str(job_seconds),
             *(["--echo-media"] if echo else [])],
            death_signal=signal.SIGINT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=env,
        )  # fmt: skip
        line = _readline(self.proc, timeout=20.0)
        m = re.search(r"at (http://\S+)", line)
        if not m:
            stop(self.proc, signal.SIGINT)
            raise RuntimeError(f"the test API server did not start: {line!r}")
        self.url = m.group(1)

    def close(self) -> None:
        stop(self.proc, signal.SIGINT, timeout=15)

    def __enter__(self) -> FakeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _readline(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            return ""
        return proc.stdout.readline().decode(errors="replace")
    finally:
        sel.close()


# ------------------------------------------------------------------ blurd as a process


def blurd_env() -> dict[str, str]:
    env = {**os.environ, "BLURIT_CLIENT_ID": CLIENT_ID, "BLURIT_SECRET_ID": SECRET_ID}
    env.pop("BLURD_CONFIG", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def write_config(
    path: Path,
    *,
    url: str,
    inbox: Path,
    outbox: Path,
    db: Path,
    settle_s: float | None = None,
    polling: bool | None = None,
    daemon_keys: dict[str, Any] | None = None,
) -> Path:
    """A config with one watch; only the keys given differ from blurd's defaults."""
    q = json.dumps  # a JSON string of plain text is a TOML basic string
    lines = ["[daemon]", f"database = {q(str(db))}"]
    lines += [f"{k} = {q(v)}" for k, v in (daemon_keys or {}).items()]
    lines += ["[blurit]", f"url = {q(url)}", "[[watch]]", f"path = {q(str(inbox))}",
              f"output = {q(str(outbox))}"]  # fmt: skip
    if settle_s is not None:
        lines.append(f"settle_seconds = {settle_s}")
    if polling is not None:
        lines.append(f"polling = {'true' if polling else 'false'}")
    path.write_text("\n".join(lines) + "\n")
    os.chmod(path, 0o600)
    return path


def _epoch(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


class DaemonProc:
    """blurd in a child process; its JSON log lines are read as they come."""

    def __init__(self, cmd: Sequence[str], log_dir: Path, name: str) -> None:
        self.stderr_path = log_dir / f"{name}.stderr"
        self.log_path = log_dir / f"{name}.jsonl"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115
        self.proc = spawn(
            cmd, death_signal=signal.SIGTERM, stdout=subprocess.PIPE, stderr=self._stderr,
            env=blurd_env(), cwd=str(log_dir),
        )  # fmt: skip
        self.events: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log_path, "wb") as keep:
            for raw in self.proc.stdout:
                keep.write(raw)
                try:
                    event = json.loads(raw)
                    event["_t"] = _epoch(event["timestamp"])
                except (ValueError, KeyError, TypeError):
                    continue
                with self.cond:
                    self.events.append(event)
                    self.counts[event.get("event", "")] += 1
                    self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_for(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait until ``pred()`` (evaluated under the lock) holds; raise after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{what}: not after {timeout:.0f} s; {self.tail()}")
                if self.proc.poll() is not None:
                    code = self.proc.returncode
                    raise RuntimeError(f"{what}: blurd exited ({code}); {self.tail()}")
                self.cond.wait(min(left, 0.5))

    def failed(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == "job.failed"]

    def tail(self) -> str:
        try:
            err = self.stderr_path.read_text(errors="replace")[-1500:]
        except OSError:
            err = ""
        last = [e.get("event") for e in self.events[-5:]]
        return f"last events {last}; stderr: {err.strip() or '(empty)'}"

    def stop(self) -> int:
        code = stop(self.proc, signal.SIGTERM, timeout=20)
        self._reader.join(timeout=5)
        self._stderr.close()
        return code


def blurd_cli_cmd(config: Path, *extra: str) -> list[str]:
    """The real command line, as users run it (production timing)."""
    return [PY, "-m", "blurd", "run", "--config", str(config), *extra]


def blurd_runner_cmd(config: Path, poll_first_s: float) -> list[str]:
    """blurd's daemon with production Timing except the delay before a job's first poll."""
    return [PY, str(Path(__file__).resolve()), "daemon", "--config", str(config),
            "--poll-first", str(poll_first_s)]  # fmt: skip


# ------------------------------------------------------------------ /proc readings


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return ticks / os.sysconf("SC_CLK_TCK")


def context_switches(pid: int) -> tuple[int, int, int]:
    """(voluntary, involuntary, threads) summed over every thread of the process.

    ``/proc/<pid>/status`` alone counts only the main thread, so the tasks are added up.
    """
    vol = invol = threads = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:
            continue
        threads += 1
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                vol += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                invol += int(line.split()[1])
    return vol, invol, threads


# ------------------------------------------------------------------ child-process modes


def _session(pool: int) -> Any:
    import requests
    from requests.adapters import HTTPAdapter

    s = requests.Session()
    adapter = HTTPAdapter(pool_maxsize=pool)
    s.mount("http://", adapter)
    return s


def _login(s: Any, url: str) -> dict[str, str]:
    r = s.post(url + "/login", json={"clientId": CLIENT_ID, "secretId": SECRET_ID}, timeout=10)
    r.raise_for_status()
    return {"Authorization": "Bearer " + r.json()["token"]}


_FORM = {
    "activation_faces_blur": "true",
    "activation_plates_blur": "true",
    "output_detections_url": "true",
    "blur_type": json.dumps({"anonymization_type": "blur", "smooth_padding": 0}),
}


def mode_serve(argv: list[str]) -> int:
    """``tests/fakeblurit.py``'s own command line, with TCP_NODELAY (see patch_nodelay)."""
    from tests import fakeblurit

    patch_nodelay()
    fakeblurit.main(argv)
    return 0


def mode_daemon(args: argparse.Namespace) -> int:
    from blurd import config, daemon, logs
    from blurd.worker import Timing

    logs.configure(sys.stdout)
    cfg = config.load(Path(args.config), os.environ)
    return daemon.run(cfg, timing=Timing(poll_first_s=args.poll_first))


def mode_bare(args: argparse.Namespace) -> int:
    """The same HTTP calls as blurd, with blurd's concurrency, and nothing else.

    Log in once; ``uploads`` threads submit (blurd: ``max_uploads``), ``io`` threads poll and
    download media and detections (blurd: the worker's 4 I/O threads), at most ``in_flight``
    jobs between submit and done (blurd: ``max_in_flight``). The results are written with a
    plain ``write`` (no fsync, no database, no hashing).
    """
    files = sorted(p for p in Path(args.inbox).iterdir() if p.is_file())
    out = Path(args.outbox)
    out.mkdir(parents=True, exist_ok=True)
    s = _session(64)
    auth = _login(s, args.url)
    slots = threading.Semaphore(args.in_flight)
    todo: queue.Queue[Path | None] = queue.Queue()
    submitted: queue.Queue[tuple[Path, str] | None] = queue.Queue()
    for f in files:
        todo.put(f)
    lock = threading.Lock()
    stamps: dict[str, list[float]] = {"upload": [], "done": []}
    errors: list[str] = []

    def uploader() -> None:
        while (f := todo.get()) is not None:
            slots.acquire()
            try:
                with lock:
                    stamps["upload"].append(time.time())
                with f.open("rb") as fh:
                    r = s.post(args.url + JOB_PATH, headers=auth, data=_FORM,
                               files={"input_media": (f.name, fh, "image/jpeg")},
                               timeout=HTTP_TIMEOUT_S)  # fmt: skip
                r.raise_for_status()
                submitted.put((f, r.json()["anonymization_job_id"]))
            except Exception as exc:
                errors.append(f"{f.name}: {exc}")
                slots.release()

    def io() -> None:
        while (item := submitted.get()) is not None:
            f, job_id = item
            try:
                time.sleep(args.poll_first)
                delay = 1.0
                while True:
                    r = s.get(args.url + JOB_PATH, headers=auth, timeout=HTTP_TIMEOUT_S,
                              params={"anonymization_job_id": job_id})  # fmt: skip
                    r.raise_for_status()
                    status = r.json()
                    if status.get("status") == "Succeeded":
                        break
                    time.sleep(delay)
                    delay *= 1.5
                for key, name in (("output_media", f.name), ("output_json", f.name + ".json")):
                    r = s.get(status[key], headers=auth, timeout=HTTP_TIMEOUT_S)
                    r.raise_for_status()
                    (out / name).write_bytes(r.content)
                with lock:
                    stamps["done"].append(time.time())
            except Exception as exc:
                errors.append(f"{f.name}: {exc}")
            finally:
                slots.release()

    cpu0 = _cpu_self()
    up = [threading.Thread(target=uploader, daemon=True) for _ in range(args.uploads)]
    workers = [threading.Thread(target=io, daemon=True) for _ in range(args.io)]
    for t in up + workers:
        t.start()
    for _ in up:
        todo.put(None)
    deadline = time.monotonic() + args.timeout
    for t in up:
        t.join(timeout=max(0.1, deadline - time.monotonic()))
    while len(stamps["done"]) + len(errors) < len(files) and time.monotonic() < deadline:
        time.sleep(0.01)
    for _ in workers:
        submitted.put(None)
    print(json.dumps({"jobs": len(files), "done": len(stamps["done"]), "errors": errors[:5],
                      "cpu_s": _cpu_self() - cpu0,
                      "first_upload": min(stamps["upload"], default=0.0),
                      "last_done": max(stamps["done"], default=0.0)}), flush=True)  # fmt: skip
    return 0 if not errors and len(stamps["done"]) == len(files) else 1


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_rss_bytes() -> int:
    """This program's peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries that over
    from the parent that forked us, so a child of a large process would report the parent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def mode_mem_blurd(args: argparse.Namespace) -> int:
    """Upload ``--file`` through BlurItEngine, poll, fetch media and detections into files."""
    from blurd.engines.base import Phase
    from blurd.engines.blurit import BlurItEngine
    from blurd.options import Options

    baseline = _peak_rss_bytes()
    started = time.monotonic()
    engine = BlurItEngine(args.url, CLIENT_ID, SECRET_ID)
    path = Path(args.file)
    try:
        remote_id = engine.submit(path, Options())
        deadline = time.monotonic() + args.timeout
        while (status := engine.poll(remote_id)).phase is not Phase.SUCCEEDED:
            if status.phase is not Phase.PENDING or time.monotonic() > deadline:
                raise RuntimeError(f"job ended as {status}")
            time.sleep(0.2)
        out = Path(args.out)
        sha = hashlib.sha256()

        class Sink:  # what the worker does: hash while writing
            def __init__(self, fh: Any) -> None:
                self.fh = fh

            def write(self, data: bytes) -> int:
                sha.update(data)
                return int(self.fh.write(data))

        with out.open("wb") as fh:
            got = engine.fetch(remote_id, status, "media", Sink(fh))  # type: ignore[arg-type]
        with open(str(out) + ".json", "wb") as fh:
            engine.fetch(remote_id, status, "detections", fh)
    finally:
        engine.close()
    print(json.dumps({"peak_rss": _peak_rss_bytes(), "baseline_rss": baseline,
                      "bytes_up": path.stat().st_size, "bytes_down": got,
                      "seconds": time.monotonic() - started}), flush=True)  # fmt: skip
    return 0


def mode_mem_plain(args: argparse.Namespace) -> int:
    """The usual upload: ``requests.post(url, files={...})`` with the file object."""
    import requests

    baseline = _peak_rss_bytes()
    started = time.monotonic()
    s = requests.Session()
    auth = _login(s, args.url)
    path = Path(args.file)
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    with path.open("rb") as fh:
        r = s.post(args.url + JOB_PATH, headers=auth, data=_FORM, timeout=HTTP_TIMEOUT_S,
                   files={"input_media": (path.name, fh, mime)})  # fmt: skip
    r.raise_for_status()
    assert r.json()["anonymization_job_id"]
    print(json.dumps({"peak_rss": _peak_rss_bytes(), "baseline_rss": baseline,
                      "bytes_up": path.stat().st_size,
                      "seconds": time.monotonic() - started}), flush=True)  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return mode_serve(argv[1:])
    p = argparse.ArgumentParser(description="child-process modes of scripts/bench")
    sub = p.add_subparsers(dest="mode", required=True)
    d = sub.add_parser("daemon")
    d.add_argument("--config", required=True)
    d.add_argument("--poll-first", type=float, required=True)
    b = sub.add_parser("bare")
    b.add_argument("--url", required=True)
    b.add_argument("--inbox", required=True)
    b.add_argument("--outbox", required=True)
    b.add_argument("--uploads", type=int, default=2)
    b.add_argument("--io", type=int, default=4)
    b.add_argument("--in-flight", type=int, default=32)
    b.add_argument("--poll-first", type=float, default=0.0)
    b.add_argument("--timeout", type=float, default=300.0)
    for name in ("mem-blurd", "mem-plain"):
        m = sub.add_parser(name)
        m.add_argument("--url", required=True)
        m.add_argument("--file", required=True)
        m.add_argument("--out", default="")
        m.add_argument("--timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    return {"daemon": mode_daemon, "bare": mode_bare, "mem-blurd": mode_mem_blurd,
            "mem-plain": mode_mem_plain}[args.mode](args)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
