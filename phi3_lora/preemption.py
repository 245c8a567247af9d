"""Preemption signals: remember that SIGTERM (or another configured signal) arrived, so the loop can stop cleanly.

The standard library only, so that ``scripts/train.py`` can install the flag before its imports, which take
seconds: a signal at any moment from then on ends the run as preempted (exit 75), never killed mid-import.
"""

from __future__ import annotations

import signal

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")  # training.preemption_signals' default: SLURM's kill, and its warning


class PreemptionFlag:
    """Remembers that one of ``names`` (SIGTERM, SIGUSR1...) arrived; the loop checks it after each step.

    A second signal during the save only sets the flag again: the save finishes and stays intact.
    ``scripts/train.py`` installs it for ``DEFAULT_SIGNALS`` before anything loads, then narrows it to
    ``training.preemption_signals`` (``narrow_to``), so that a signal during the imports, loading,
    tokenization or the first evaluation also ends the run as preempted (exit 75), not killed.
    """

    def __init__(self, names):
        self.received: int | None = None  # the last preemption signal that arrived
        self.arrived: list[int] = []  # every signal caught, in order (narrow_to hands back those it stops catching)
        self.previous = {}
        self._install(names)

    def _install(self, names) -> None:
        for name in names:
            number = getattr(signal, name)
            if number not in self.previous:
                self.previous[number] = signal.signal(number, self._handle)

    def _handle(self, number, frame):
        self.received = number
        self.arrived.append(number)

    def narrow_to(self, names) -> PreemptionFlag:
        """Catch exactly ``names`` from now on. A signal caught so far that is not among them gets its own
        handler back and is delivered again: it does what it would have done had the flag never caught it.
        Those among them stay received."""
        numbers = {getattr(signal, name) for name in names}
        caught = self.arrived
        handed_back = [n for n in self.previous if n not in numbers]
        for number in handed_back:
            signal.signal(number, self.previous.pop(number))
        self.arrived = [n for n in caught if n in numbers]
        self.received = self.arrived[-1] if self.arrived else None
        self._install(names)
        for number in handed_back:
            if number in caught:
                signal.raise_signal(number)
        return self

    def restore(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    def __enter__(self) -> PreemptionFlag:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
