"""Signal handling for the daemon: handlers only set events (DESIGN.md section 5)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType


class Signals:
    """SIGTERM/SIGINT set ``stop`` (a second one exits at once); SIGHUP sets ``reload``.

    The handlers only set events, so they are safe wherever the main thread happens to be.
    """

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.reload = threading.Event()
        self._stops = 0

    def handle_stop(self, signum: int, _frame: FrameType | None) -> None:
        self._stops += 1
        if self._stops > 1:
            os._exit(128 + signum)
        self.stop.set()

    def handle_reload(self, _signum: int, _frame: FrameType | None) -> None:
        self.reload.set()

    def signal_map(self) -> dict[int, Callable[[int, FrameType | None], None]]:
        return {
            signal.SIGTERM: self.handle_stop,
            signal.SIGINT: self.handle_stop,
            signal.SIGHUP: self.handle_reload,
        }

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in self.signal_map().items():
            signal.signal(sig, handler)
