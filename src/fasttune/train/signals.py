"""SIGINT/SIGTERM during training: the first asks the loop to stop after the current step (which then saves a
checkpoint); a second SIGINT stops at once. Handlers are restored when training ends."""
from __future__ import annotations

import signal
import sys
import threading


class GracefulStop:
    def __init__(self):
        self.requested: str | None = None
        self._old = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.requested = name
        print(f"\nfasttune: {name} received; finishing the current step and saving a checkpoint "
              f"(press Ctrl-C again to stop at once).", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False
