"""A real two-node SLURM cluster on this machine, for the tests of scripts/slurm/.

Debian's ``slurm-wlm`` runs it: munged with a fresh key, slurmctld, and two slurmd daemons
(``slurmd -N n1``, ``slurmd -N n2``) that both live on this host at 127.0.0.1, each with 2 CPUs.
Everything (config, key, state, spool, logs, sockets) is under a private temporary directory, the
ports are free ones picked at start, and the daemons run in the foreground as our children, so
they are stopped by the PIDs started here. The node names are added to /etc/hosts (and removed
again) because training processes reach the main process by its host name, as on a real cluster.

Needs root (SlurmUser=root, /etc/hosts); installs ``slurm-wlm`` and ``munge`` with apt-get when
they are missing. The ``slurm_cluster`` fixture skips, with the reason, when that is impossible
(not root, no apt-get); once it is possible (CI runs as root), a failure to come up is an error.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

NODES = ("n1", "n2")
CPUS_PER_NODE = 2
PARTITION = "test"
HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARK = "# phi3-lora test SLURM cluster"
PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")


class ClusterUnavailable(Exception):
    """This machine cannot run the test cluster (not root, no apt-get); the message says why."""


def install_slurm() -> None:
    """apt-get install slurm-wlm and munge when their programs are missing."""
    if all(shutil.which(name) for name in DAEMONS):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable("SLURM is not installed and installing it (apt-get) needs root")
    if not shutil.which("apt-get"):
        raise ClusterUnavailable("SLURM is not installed and there is no apt-get to install slurm-wlm and munge")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}:\n"
                               f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _die_with_parent() -> None:
    """In a daemon about to start: get SIGTERM if pytest dies without stopping the cluster (Linux prctl)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class SlurmCluster:
    """Start with ``start()``, stop with ``stop()``; ``env`` is the environment for sbatch, squeue, scontrol."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.added_hosts = False

    # ------------------------------------------------------------------ bring-up

    def start(self, timeout: float = 90) -> SlurmCluster:
        if os.geteuid() != 0:
            raise ClusterUnavailable("the test SLURM cluster runs its daemons as root (SlurmUser=root)")
        install_slurm()
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        self.conf.write_text(self.slurm_conf())
        self._add_hosts()
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}"])
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged's socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, timeout, "slurmctld")
        for node in NODES:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait(self._nodes_idle, timeout, f"nodes {', '.join(NODES)} to be idle")
        return self

    def slurm_conf(self) -> str:
        ctld_port, *node_ports = free_ports(1 + len(NODES))
        host, root = socket.gethostname().split(".")[0], self.root
        nodes = "\n".join(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                          f"CPUs={CPUS_PER_NODE} State=UNKNOWN" for node, port in zip(NODES, node_ports))
        # cred_expire is also how long a requeued job waits before it may start again (default 120 s); the
        # short scheduler intervals start it soon after that (by default the next pass is up to 30 s later).
        return f"""\
ClusterName=phi3test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
{nodes}
PartitionName={PARTITION} Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""

    def _add_hosts(self) -> None:
        missing = []
        for node in NODES:
            try:
                socket.gethostbyname(node)
            except OSError:
                missing.append(node)
        if missing:
            with HOSTS_FILE.open("a") as hosts:
                hosts.write(f"127.0.0.1 {' '.join(missing)} {HOSTS_MARK}\n")
            self.added_hosts = True

    def _spawn(self, name: str, command: list[str]) -> None:
        log = (self.root / "log" / f"{name}.stdout").open("w")
        self.procs[name] = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"the test SLURM cluster did not come up waiting for {what} "
                                   f"(exited: {dead or 'none'}); logs:\n{self.logs()}")
            time.sleep(0.5)

    def _nodes_idle(self) -> bool:
        states = self.run("sinfo", "--noheader", "--Node", "--format=%N %T", check=False).stdout.split()
        return states.count("idle") == len(NODES)

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}"
                         for path in sorted((self.root / "log").iterdir()))

    # ------------------------------------------------------------------ use

    def run(self, *command: str, check: bool = True, timeout: float = 60, cwd: Path | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a SLURM client command (sbatch, squeue, scontrol, scancel) against this cluster."""
        proc = subprocess.run(command, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", "--oneliner", str(job_id)).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait_for(self, job_id: int, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info["JobState"] in states:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} is {info['JobState']} after {timeout}s, not {states}")
            time.sleep(1)

    # ------------------------------------------------------------------ shutdown

    def stop(self) -> None:
        """Cancel what still runs, then stop the daemons by the PIDs started here (slurmd first)."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", f"--partition={PARTITION}", check=False)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.run("squeue", "--noheader", check=False).stdout.strip():
                time.sleep(1)
        for name in [*(f"slurmd-{node}" for node in NODES), "slurmctld", "munged"]:
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.added_hosts:
            lines = HOSTS_FILE.read_text().splitlines(keepends=True)
            HOSTS_FILE.write_text("".join(line for line in lines if HOSTS_MARK not in line))
            self.added_hosts = False


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running two-node SLURM cluster (n1, n2; 2 CPUs each) for the whole session."""
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except ClusterUnavailable as reason:
        cluster.stop()
        pytest.skip(f"no test SLURM cluster: {reason}")
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()
