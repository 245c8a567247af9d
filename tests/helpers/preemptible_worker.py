"""A stand-in for a training process that obeys the preemption protocol, for the launcher and SLURM tests.

Takes the training script's arguments and uses only ``output_dir=DIR``. It writes
``DIR/started.rank{R}.attempt{A}`` (A = SLURM_RESTART_COUNT, 0 outside SLURM). On its first attempt it
waits for SIGUSR1 or SIGTERM, records it in ``DIR/signalled.rank{R}`` and exits 75 ("checkpoint saved,
requeue me"), after ``WORKER_SAVE_SECONDS`` (default 0) spent "saving"; ``WORKER_EXIT=N`` makes it exit N
at once instead. On a later attempt it writes
``DIR/finished.rank{R}`` and exits 0, as a resumed run that completes.
"""

import os
import signal
import sys
import time
from pathlib import Path

EX_PREEMPTED = 75


def main() -> int:
    out = Path(next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("output_dir=")))
    out.mkdir(parents=True, exist_ok=True)
    rank, attempt = os.environ.get("RANK", "0"), int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    received = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    (out / f"started.rank{rank}.attempt{attempt}").write_text(str(os.getpid()))
    if "WORKER_EXIT" in os.environ:
        return int(os.environ["WORKER_EXIT"])
    if attempt > 0:
        (out / f"finished.rank{rank}").write_text("")
        return 0
    deadline = time.monotonic() + 300
    while not received and time.monotonic() < deadline:
        time.sleep(0.05)
    if not received:
        return 1
    time.sleep(float(os.environ.get("WORKER_SAVE_SECONDS", "0")))
    (out / f"signalled.rank{rank}").write_text(signal.Signals(received[0]).name)
    return EX_PREEMPTED


if __name__ == "__main__":
    sys.exit(main())
