"""One node's share of a SLURM job: derive `accelerate launch`'s topology from SLURM and run it.

Run it as one task per node, from the repository root; the sbatch files beside it do:
    srun --ntasks-per-node=1 python scripts/slurm/launch.py --config_file accelerate_configs/multi_node_zero3.yaml \
        scripts/train.py --config configs/phi3-medium-4k-lora.yaml output_dir=/scratch/phi3-medium
It reads SLURM_JOB_NODELIST (the first host is the main process's), SLURM_NNODES, SLURM_NODEID (this
machine's rank) and SLURM_JOB_ID (the rendezvous port, 20000 + job id mod 10000, below Linux's
ephemeral ports; the same after a requeue), counts the GPUs of this node (SLURM_GPUS_ON_NODE, else
CUDA), prints the command and runs it. Without CUDA it starts one process per node that trains on the
CPU over gloo (DDP on the CPU: a MULTI_GPU launch whose script builds ``Accelerator(cpu=True)``).
Show the command without running it: ``--dry_run``.

Preemption: SLURM signals a job before its time runs out (``--signal=USR1@120``), and on a preemption
or ``scancel`` it sends SIGTERM. The training processes must see the signal so that they finish their
step, save a checkpoint and exit with status 75 ("preempted, requeue me"). SLURM delivers a step's
signals to all of its processes (proctrack/cgroup and linuxproc); accelerate launch runs here through
accelerate_agent.py, whose torchrun agent survives SIGUSR1. Where only this task would be signalled,
torchrun's workers, which run in sessions of their own, would not be: so a SIGUSR1 or SIGTERM that
reaches this launcher is also passed on to them directly (the loop's handler only sets a flag, a
second delivery is harmless). This launcher exits 75 when its run was signalled and did not finish
cleanly, or the run itself exited 75 (torchrun reports any failed worker as status 1).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

EX_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint is saved, requeue the job
PORT_BASE, PORT_SPAN = 20000, 10000
FORWARDED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
AGENT = Path(__file__).resolve().with_name("accelerate_agent.py")


class LaunchError(ValueError):
    """The SLURM environment or the arguments cannot describe a launch. The message names the variable."""


def expand_nodelist(text: str) -> list[str]:
    """SLURM's compressed host list as host names: ``"gpu[01-03],x7"`` -> ``["gpu01", "gpu02", "gpu03", "x7"]``.

    Ranges keep the zero padding of their first number; several bracket groups in one name
    (``r[1-2]-n[1-2]``) expand to every combination, as ``scontrol show hostnames`` does.

    Raises:
        LaunchError: for unbalanced brackets or a range that is not ``N`` or ``LOW-HIGH``.
    """
    hosts: list[str] = []
    for item in _split_top_level(text.strip()):
        hosts.extend(_expand_host(item, text))
    if not hosts:
        raise LaunchError(f"SLURM_JOB_NODELIST: no host names in {text!r}")
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split at the commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise LaunchError(f"SLURM_JOB_NODELIST: unbalanced brackets in {text!r}")
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise LaunchError(f"SLURM_JOB_NODELIST: unbalanced brackets in {text!r}")
    items.append(text[start:])
    return [item for item in items if item]


def _expand_host(item: str, whole: str) -> list[str]:
    match = re.match(r"([^\[]*)\[([^\]]*)\](.*)$", item)
    if not match:
        return [item]
    prefix, ranges, rest = match.groups()
    tails = _expand_host(rest, whole) if rest else [""]
    names = []
    for part in ranges.split(","):
        bounds = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not bounds or (bounds[2] and int(bounds[2]) < int(bounds[1])):
            raise LaunchError(f"SLURM_JOB_NODELIST: bad range {part!r} in {whole!r}")
        low, high = bounds[1], bounds[2] or bounds[1]
        names.extend(f"{prefix}{n:0{len(low)}d}" for n in range(int(low), int(high) + 1))
    return [name + tail for name in names for tail in tails]


def job_port(job_id: int) -> int:
    """The rendezvous port of a job: fixed by its id (so a requeued job gets the same one), 20000-29999."""
    return PORT_BASE + job_id % PORT_SPAN


@dataclass(frozen=True)
class Topology:
    """Where this node stands in the job, in accelerate launch's terms."""
    hosts: list[str]
    machine_rank: int
    procs_per_node: int
    port: int
    on_gpu: bool

    @property
    def num_machines(self) -> int:
        return len(self.hosts)

    @property
    def num_processes(self) -> int:
        return self.num_machines * self.procs_per_node

    @property
    def main_host(self) -> str:
        return self.hosts[0]


def _int_env(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        if env.get(name, "").strip():
            try:
                return int(env[name])
            except ValueError:
                raise LaunchError(f"{name}: expected an integer, got {env[name]!r}") from None
    return None


def topology_from_env(env: Mapping[str, str], cuda_devices: int, gpus_per_node: int | None = None,
                      port: int | None = None) -> Topology:
    """Read this node's place in the job from SLURM's environment variables.

    Args:
        env: the environment (``os.environ`` inside an ``srun`` task).
        cuda_devices: GPUs CUDA sees on this node (0 = train on the CPU, one process per node).
        gpus_per_node: processes per node, overriding SLURM_GPUS_ON_NODE (capped by the CUDA count) and the
            CUDA count; more than CUDA sees is an error.
        port: the rendezvous port, overriding the one derived from SLURM_JOB_ID.

    Raises:
        LaunchError: a variable is missing or contradicts another; the message names it.
    """
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError("SLURM_JOB_NODELIST is not set: run this inside a SLURM job (srun --ntasks-per-node=1 ...)")
    hosts = expand_nodelist(nodelist)
    nnodes = _int_env(env, "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    if nnodes is not None and nnodes != len(hosts):
        raise LaunchError(f"SLURM_NNODES={nnodes} but SLURM_JOB_NODELIST={nodelist!r} names {len(hosts)} hosts")
    rank = _int_env(env, "SLURM_NODEID")
    if rank is None:
        raise LaunchError("SLURM_NODEID is not set: run one task per node with srun, not in the batch script itself")
    if not 0 <= rank < len(hosts):
        raise LaunchError(f"SLURM_NODEID={rank} is outside the job's {len(hosts)} nodes")
    if port is None:
        job_id = _int_env(env, "SLURM_JOB_ID", "SLURM_JOBID")
        if job_id is None:
            raise LaunchError("SLURM_JOB_ID is not set: give --main_process_port")
        port = job_port(job_id)
    on_gpu = cuda_devices > 0
    allotted = _int_env(env, "SLURM_GPUS_ON_NODE") if on_gpu else None
    # SLURM's count, but never more than CUDA sees (CUDA_VISIBLE_DEVICES narrowed inside the job)
    procs = gpus_per_node or (min(allotted, cuda_devices) if allotted else None) or cuda_devices or 1
    if procs < 1:
        raise LaunchError(f"processes per node must be at least 1, got {procs}")
    if on_gpu and procs > cuda_devices:
        raise LaunchError(f"--gpus_per_node {procs}: this node's CUDA sees {cuda_devices} GPU(s)")
    return Topology(hosts=hosts, machine_rank=rank, procs_per_node=procs, port=port, on_gpu=on_gpu)


def accelerate_command(topo: Topology, script: str, script_args: list[str], config_file: str | None = None,
                       python: str = sys.executable) -> list[str]:
    """The ``accelerate launch`` command line (through accelerate_agent.py) that starts this node's processes.

    With a config file the launch type (DDP, DeepSpeed) comes from it; without one, several processes
    are a DDP launch (``--multi_gpu``; on the CPU the training script runs it over gloo).
    """
    command = [python, str(AGENT)]
    if config_file:
        command += ["--config_file", config_file]
    else:
        command += ["--mixed_precision", "no", "--dynamo_backend", "no"]
        if topo.num_processes > 1:
            command.append("--multi_gpu")
    command += ["--num_machines", str(topo.num_machines), "--num_processes", str(topo.num_processes),
                "--machine_rank", str(topo.machine_rank), "--main_process_ip", topo.main_host,
                "--main_process_port", str(topo.port), script, *script_args]
    return command


def omp_threads(env: Mapping[str, str], procs_per_node: int) -> int | None:
    """CPU threads per process: this task's cores (SLURM_CPUS_PER_TASK) shared by its processes.

    None when OMP_NUM_THREADS is already set, or SLURM gives no CPU count (torchrun then sets 1 per
    process when there are several, which starves data work on a node with many cores).
    """
    cpus = _int_env(env, "SLURM_CPUS_PER_TASK")
    if "OMP_NUM_THREADS" in env or not cpus:
        return None
    return max(1, cpus // procs_per_node)


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def run_forwarding_signals(command: list[str], env: Mapping[str, str] | None = None,
                           poll_seconds: float = 0.2) -> int:
    """Run ``command``; pass a SIGUSR1/SIGTERM received here on to its children, the training processes.

    Returns:
        The command's exit status, or 75 when a forwarded signal ended a run that did not finish
        cleanly (torchrun turns any worker's non-zero status into 1).
    """
    received: list[int] = []
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, lambda signum, frame: received.append(signum))
    child = subprocess.Popen(command, env=env)
    forwarded = 0
    while child.poll() is None:
        if forwarded < len(received):
            workers = child_pids(child.pid)
            for pid in workers:  # workers not started yet get it on the next poll
                _signal(pid, received[forwarded])
            if workers:
                print(f"launch: forwarded {signal.Signals(received[forwarded]).name} to training processes "
                      f"{workers}", flush=True)
                forwarded += 1
        time.sleep(poll_seconds)
    status = child.returncode if child.returncode >= 0 else 128 - child.returncode
    if status == EX_PREEMPTED or (received and status != 0):
        return EX_PREEMPTED
    return status


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # it ended meanwhile


def cuda_device_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_file", help="accelerate config (launch type: DDP, DeepSpeed ZeRO); default: "
                        "DDP over all processes")
    parser.add_argument("--gpus_per_node", type=int, help="processes per node (default: SLURM_GPUS_ON_NODE, "
                        "else the GPUs CUDA sees, else 1 on the CPU)")
    parser.add_argument("--main_process_port", type=int, help="rendezvous port (default: from SLURM_JOB_ID)")
    parser.add_argument("--dry_run", action="store_true", help="print the command and exit")
    parser.add_argument("script", help="training script, e.g. scripts/train.py")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments (--config, KEY=VALUE)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        topo = topology_from_env(os.environ, cuda_device_count(), args.gpus_per_node, args.main_process_port)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    command = accelerate_command(topo, args.script, args.script_args, args.config_file)
    env = dict(os.environ)
    threads = omp_threads(env, topo.procs_per_node)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    device = "GPU" if topo.on_gpu else "CPU (gloo)"
    print(f"launch: node {topo.machine_rank} of {topo.num_machines} ({', '.join(topo.hosts)}), "
          f"{topo.procs_per_node} {device} process(es) per node, {topo.num_processes} in all, "
          f"main process {topo.main_host}:{topo.port}, OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}\n"
          f"launch: {shlex.join(command)}", flush=True)
    if args.dry_run:
        return 0
    return run_forwarding_signals(command, env)


if __name__ == "__main__":
    sys.exit(main())
