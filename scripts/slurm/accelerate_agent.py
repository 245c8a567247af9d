"""`accelerate launch` that survives SIGUSR1: the process scripts/slurm/launch.py starts on each node.

SLURM's advance warning before a time limit (``--signal=USR1@120``) reaches every process of the job
step. accelerate launch's torchrun agent has no handler for SIGUSR1 and would die of it, leaving its
training processes orphaned; here the agent catches and ignores it. Its children, the training
processes, start with SIGUSR1's default action again (an exec resets caught signals, where an
ignored one would stay ignored and a signal arriving before the loop installs its handler would be
lost): the training loop checkpoints on it, and a process killed by it before then ends the run as
preempted all the same. Arguments are accelerate launch's:
    python scripts/slurm/accelerate_agent.py --num_processes 2 --multi_gpu scripts/train.py ...
"""

import runpy
import signal
import sys

if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    sys.argv[0] = "accelerate launch"
    runpy.run_module("accelerate.commands.launch", run_name="__main__", alter_sys=True)
