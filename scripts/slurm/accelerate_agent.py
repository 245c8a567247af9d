"""`accelerate launch` that survives SIGUSR1: the process scripts/slurm/launch.py starts on each node.

SLURM's advance warning before a time limit (``--signal=USR1@120``) reaches every process of the job
step. accelerate launch's torchrun agent has no handler for SIGUSR1 and would die of it, leaving its
training processes orphaned; here the agent catches and ignores it. Its children, the training
processes, start with SIGUSR1's default action again (an exec resets caught signals, where an
ignored one would stay ignored and a signal arriving before the loop installs its handler would be
lost): the training loop checkpoints on it, and a process killed by it before then ends the run as
preempted all the same.

On SIGTERM, accelerate's launcher of a single process (no torchrun) terminates its child and kills it
5 seconds later: too soon for a preempted run to finish its step and save (SLURM itself waits
``KillWait``, 30 s by default, before its SIGKILL). Here that launcher waits for its child instead,
which got the SIGTERM too (from SLURM, and from launch.py). Arguments are accelerate launch's:
    python scripts/slurm/accelerate_agent.py --num_processes 2 --multi_gpu scripts/train.py ...
"""

import signal
import sys


def wait_for_the_training_process(process) -> None:
    """In place of accelerate's ``_terminate_process_tree``: pass SIGTERM on and wait, never SIGKILL."""
    import psutil

    try:
        process.terminate()
    except psutil.NoSuchProcess:
        pass
    process.wait()


if __name__ == "__main__":
    import accelerate.commands.launch as accelerate_launch

    signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    accelerate_launch._terminate_process_tree = wait_for_the_training_process
    sys.argv[0] = "accelerate launch"
    accelerate_launch.main()  # in this module, so that it calls the function above
