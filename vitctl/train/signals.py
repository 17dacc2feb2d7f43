"""The stop flag of both training loops (vitctl.train.loop, JAX; vitctl.train.torch_loop, torch).
Stdlib only: the torch loop imports no jax."""

from __future__ import annotations

import signal
import threading


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves and stops after the current step.

    A context manager: the handlers are installed on entry (in the main thread only: elsewhere
    Python refuses them, and the flag stays 0) and the previous ones restored on exit."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
