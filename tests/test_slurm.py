"""SLURM: the launcher's arguments, its signal forwarding, and the sbatch files on a real 2-node cluster.

The cluster (tests/slurm_cluster.py) is real SLURM on this machine: nodes n1 and n2 share the host,
so a "multi-node" job here is two accelerate launches, one per node, training on the CPU over gloo.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import FAST, ROOT, load_adapter_tensors, read_metrics

SLURM = ROOT / "scripts" / "slurm"
WORKER = ROOT / "tests" / "helpers" / "preemptible_worker.py"


def _import_launcher():
    spec = importlib.util.spec_from_file_location("slurm_launch", SLURM / "launch.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


launch = _import_launcher()


# ----------------------------------------------------------------------------- argument derivation

@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-04]", ["gpu01", "gpu02", "gpu03", "gpu04"]),
    ("a1,b2", ["a1", "b2"]),
    ("n[1-2],x7", ["n1", "n2", "x7"]),
    ("node7", ["node7"]),
    ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
    ("gpu[001-002,010],cpu5", ["gpu001", "gpu002", "gpu010", "cpu5"]),
    ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert launch.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["gpu[01-", "gpu01]", "gpu[3-1]", "gpu[a-b]", ""])
def test_expand_nodelist_rejects_malformed_lists(nodelist):
    with pytest.raises(launch.LaunchError, match="SLURM_JOB_NODELIST"):
        launch.expand_nodelist(nodelist)


def slurm_env(nodelist, node_id, job_id="4242", **extra):
    nnodes = len(launch.expand_nodelist(nodelist))
    return {"SLURM_JOB_NODELIST": nodelist, "SLURM_NNODES": str(nnodes), "SLURM_NODEID": str(node_id),
            "SLURM_JOB_ID": job_id, **extra}


def flag(command, name):
    return command[command.index(name) + 1]


@pytest.mark.parametrize("nodelist, node_id, gpus, main_host", [
    ("gpu[01-04]", 2, 8, "gpu01"),
    ("a1,b2", 1, 4, "a1"),
    ("solo", 0, 1, "solo"),
])
def test_topology_and_command_on_gpu_nodes(nodelist, node_id, gpus, main_host):
    nodes = len(launch.expand_nodelist(nodelist))
    topo = launch.topology_from_env(slurm_env(nodelist, node_id, job_id="123456"), cuda_devices=gpus)
    command = launch.accelerate_command(topo, "scripts/train.py", ["--config", "r.yaml", "lora.r=8"],
                                        config_file="accelerate_configs/multi_node_zero3.yaml", python="py")
    assert command[:2] == ["py", str(SLURM / "accelerate_agent.py")]
    assert flag(command, "--config_file") == "accelerate_configs/multi_node_zero3.yaml"
    assert flag(command, "--num_machines") == str(nodes)
    assert flag(command, "--num_processes") == str(nodes * gpus)
    assert flag(command, "--machine_rank") == str(node_id)
    assert flag(command, "--main_process_ip") == main_host
    assert flag(command, "--main_process_port") == str(20000 + 123456 % 10000) == "23456"
    assert command[-4:] == ["scripts/train.py", "--config", "r.yaml", "lora.r=8"]
    assert "--multi_gpu" not in command  # the config file says DeepSpeed


def test_gpus_per_node_comes_from_slurm_then_cuda_then_the_flag():
    env = slurm_env("gpu[01-02]", 0, SLURM_GPUS_ON_NODE="4")
    assert launch.topology_from_env(env, cuda_devices=8).num_processes == 2 * 4
    assert launch.topology_from_env(slurm_env("gpu[01-02]", 0), cuda_devices=8).num_processes == 2 * 8
    assert launch.topology_from_env(env, cuda_devices=8, gpus_per_node=2).num_processes == 2 * 2
    # SLURM allots 4 but CUDA_VISIBLE_DEVICES narrowed the node to 2: one process per GPU CUDA sees
    assert launch.topology_from_env(env, cuda_devices=2).num_processes == 2 * 2
    with pytest.raises(launch.LaunchError, match=r"^--gpus_per_node 4: this node's CUDA sees 2 GPU\(s\)$"):
        launch.topology_from_env(env, cuda_devices=2, gpus_per_node=4)


def test_cpu_nodes_run_one_ddp_process_each():
    topo = launch.topology_from_env(slurm_env("n[1-2]", 1, SLURM_GPUS_ON_NODE="4"), cuda_devices=0)
    assert (topo.on_gpu, topo.procs_per_node, topo.num_processes) == (False, 1, 2)
    command = launch.accelerate_command(topo, "scripts/train.py", [])
    assert "--multi_gpu" in command  # with Accelerator(cpu=True) in the script: DDP over gloo
    single = launch.topology_from_env(slurm_env("n1", 0), cuda_devices=0)
    assert "--multi_gpu" not in launch.accelerate_command(single, "scripts/train.py", [])


def test_cpu_threads_share_the_task_cores():
    assert launch.omp_threads({"SLURM_CPUS_PER_TASK": "32"}, procs_per_node=8) == 4
    assert launch.omp_threads({"SLURM_CPUS_PER_TASK": "4"}, procs_per_node=8) == 1
    assert launch.omp_threads({"SLURM_CPUS_PER_TASK": "32", "OMP_NUM_THREADS": "2"}, procs_per_node=8) is None
    assert launch.omp_threads({}, procs_per_node=8) is None


def test_port_is_fixed_by_the_job_and_in_range():
    ports = {launch.job_port(job_id) for job_id in range(0, 100000, 7)}
    assert min(ports) >= 20000 and max(ports) < 30000
    assert launch.job_port(77) == launch.job_port(77) == 20077
    topo = launch.topology_from_env(slurm_env("n1", 0), cuda_devices=0, port=31000)
    assert topo.port == 31000


@pytest.mark.parametrize("env, message", [
    ({}, "SLURM_JOB_NODELIST is not set"),
    ({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "1"}, "SLURM_NODEID is not set"),
    ({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "3", "SLURM_NODEID": "0", "SLURM_JOB_ID": "1"},
     "SLURM_NNODES=3 but"),
    ({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NODEID": "2", "SLURM_JOB_ID": "1"}, "SLURM_NODEID=2 is outside"),
    ({"SLURM_JOB_NODELIST": "n1", "SLURM_NODEID": "0", "SLURM_JOB_ID": "x"}, "SLURM_JOB_ID: expected an integer"),
])
def test_bad_environments_are_named(env, message):
    with pytest.raises(launch.LaunchError, match=message):
        launch.topology_from_env(env, cuda_devices=0)


def test_launcher_prints_and_dry_runs(tmp_path):
    env = {**os.environ, **slurm_env("n[1-2]", 1, job_id="7", SLURM_CPUS_PER_TASK="2")}
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run([sys.executable, str(SLURM / "launch.py"), "--dry_run", "scripts/train.py", "lora.r=4"],
                          env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert ("node 1 of 2 (n1, n2), 1 CPU (gloo) process(es) per node, 2 in all, main process n1:20007, "
            "OMP_NUM_THREADS=2") in proc.stdout
    assert "--machine_rank 1 --main_process_ip n1 --main_process_port 20007 scripts/train.py lora.r=4" in proc.stdout
    env.pop("SLURM_NODEID")
    proc = subprocess.run([sys.executable, str(SLURM / "launch.py"), "scripts/train.py"], env=env,
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: SLURM_NODEID is not set")


# ----------------------------------------------------------------------------- signals, without SLURM

def start_local_launch(out, processes=2, **env):
    """launch.py on one 'node' with ``processes`` CPU processes of the preemptible stand-in worker, in a process
    group of its own (as a SLURM job step's)."""
    full_env = {**os.environ, **slurm_env("localhost", 0, job_id=str(os.getpid())), "PYTHONUNBUFFERED": "1", **env}
    command = [sys.executable, str(SLURM / "launch.py"), "--gpus_per_node", str(processes), str(WORKER),
               f"output_dir={out}"]
    return subprocess.Popen(command, env=full_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for_files(paths, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"{paths} did not appear"
        time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_launcher_forwards_signals_to_the_training_processes(tmp_path, sig):
    """Only the launcher is signalled (as under a process-group-only proctrack): both workers get it,
    and the preempted run's status comes out as 75."""
    proc = start_local_launch(tmp_path)
    wait_for_files([tmp_path / f"started.rank{r}.attempt0" for r in (0, 1)], proc)
    proc.send_signal(sig)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, output[-3000:]
    assert [(tmp_path / f"signalled.rank{r}").read_text() for r in (0, 1)] == [sig.name, sig.name]
    assert f"forwarded {sig.name} to training processes" in output


def test_a_single_process_launch_gives_the_run_time_to_save_on_sigterm(tmp_path):
    """SIGTERM to the whole step, as SLURM sends it: accelerate's launcher of one process (no torchrun) would
    SIGKILL its child 5 s later; through accelerate_agent.py it waits, so a worker that takes 8 s to save
    still saves and exits 75."""
    proc = start_local_launch(tmp_path, processes=1, WORKER_SAVE_SECONDS="8")
    wait_for_files([tmp_path / "started.rank0.attempt0"], proc)
    os.killpg(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, output[-3000:]
    assert (tmp_path / "signalled.rank0").read_text() == "SIGTERM"


def test_launcher_passes_failures_through(tmp_path):
    """Without a signal a failed run is not 'preempted': its status stays non-zero and is not 75."""
    proc = start_local_launch(tmp_path, WORKER_EXIT="3")
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode not in (0, 75), output[-3000:]


# ----------------------------------------------------------------------------- the real cluster

def test_cluster_skips_with_a_reason_without_root(monkeypatch, tmp_path):
    """Where the cluster cannot come up the fixture skips with this reason (CI runs as root)."""
    import slurm_cluster
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(slurm_cluster.ClusterUnavailable, match="root"):
        slurm_cluster.SlurmCluster(tmp_path).start()
    monkeypatch.setattr(slurm_cluster.shutil, "which", lambda name: None)
    with pytest.raises(slurm_cluster.ClusterUnavailable, match="installing it .apt-get. needs root"):
        slurm_cluster.install_slurm()


def job_log(tmp_path, job_id) -> str:
    # srun interleaves the nodes' output, which can split a progress bar's multi-byte characters
    return (tmp_path / f"slurm-{job_id}.out").read_text(errors="replace")


def submit(cluster, tmp_path, sbatch_file, *args, nodes=2, wait=True, env=None):
    """sbatch a file of scripts/slurm to the test cluster, on its 2 CPUs per node; returns the job id."""
    job_env = {"PYTHON": sys.executable, "ACCELERATE_CONFIG": "accelerate_configs/multi_gpu_ddp.yaml",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **(env or {})}
    options = ["--parsable", f"--nodes={nodes}", "--gpus-per-node=0", "--cpus-per-task=2",
               f"--output={tmp_path}/slurm-%j.out"]
    proc = cluster.run("sbatch", *options, *(["--wait"] if wait else []), str(SLURM / sbatch_file), *args,
                       cwd=ROOT, env=job_env, check=False, timeout=900)
    job_id = int(proc.stdout.split(";")[0].strip().splitlines()[0])
    if wait:
        log = job_log(tmp_path, job_id)
        assert proc.returncode == 0, f"job {job_id} exited {proc.returncode}:\n{log[-5000:]}\n{proc.stderr}"
    return job_id


PREEMPT_STEPS = 16  # an epoch is 13 steps (104 training examples, 4 a step on each of 2 nodes): the resumed run
#                    crosses an epoch boundary


@pytest.fixture(scope="module")
def two_node_run(slurm_cluster, tmp_path_factory):
    """One uninterrupted training job on both nodes: (its output_dir, its log, its job id, its arguments but for
    output_dir). The recipe comes with --config after job.sh's own override (as the README's commands put it);
    the settings are ones under which a resumed run is bit-exact."""
    logs = tmp_path_factory.mktemp("two_node_run")
    recipe = logs / "recipe.yaml"
    recipe.write_text("training:\n  learning_rate: 3.0e-3\n")
    args = ["--config", str(recipe), *FAST, f"training.max_steps={PREEMPT_STEPS}", "training.save_steps=4",
            "lora.dropout=0", "data.eval_size=16"]
    out = logs / "run"
    job_id = submit(slurm_cluster, logs, "train_multinode.sbatch", f"output_dir={out}", *args)
    return out, job_log(logs, job_id), job_id, args


def test_multinode_sbatch_trains_one_process_per_node(two_node_run):
    from peft import PeftModel
    from phi3_lora.config import load_config
    from phi3_lora.model import load_model, load_tokenizer

    out, log, job_id, _ = two_node_run
    port = 20000 + job_id % 10000
    for node in (0, 1):  # srun --label prefixes each task's lines with its number
        assert f"{node}: launch: node {node} of 2 (n1, n2), 1 CPU (gloo) process(es) per node, 2 in all, " \
               "main process n1:" in log
        assert f"--machine_rank {node} --main_process_ip n1 --main_process_port {port}" in log
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["num_processes"], summary["distributed_type"], summary["steps"]) == (2, "MULTI_CPU", PREEMPT_STEPS)
    assert summary["final_eval_loss"] < summary["first_eval_loss"]
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == list(range(1, PREEMPT_STEPS + 1))  # one writer

    cfg = load_config(out / "config.yaml")
    assert (cfg.training.learning_rate, cfg.training.resume_from) == (3e-3, "auto")
    base = load_model(cfg.model, load_tokenizer(cfg.model), seed=cfg.training.seed)
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    saved = load_adapter_tensors(out)
    assert len(saved) > 0 and saved.keys() == {k for k in loaded if k in saved} and len(loaded) == len(saved)
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    assert all(value.abs().sum() > 0 for key, value in saved.items() if "lora_B" in key)  # it trained


def test_single_node_sbatch_files_launch_their_accelerate_config(slurm_cluster, tmp_path):
    """train_single_node (DDP) and qlora_single_gpu (one process): their headers are accepted and each
    starts its launch type; here on one CPU node each, with the stand-in worker, both jobs at once."""
    jobs = {}
    for sbatch_file, config in [("train_single_node.sbatch", "accelerate_configs/multi_gpu_ddp.yaml"),
                                ("qlora_single_gpu.sbatch", "accelerate_configs/single_gpu.yaml")]:
        out = tmp_path / sbatch_file
        env = {"TRAIN_SCRIPT": str(WORKER), "WORKER_EXIT": "0", "ACCELERATE_CONFIG": ""}  # "": the file's own
        jobs[sbatch_file] = (submit(slurm_cluster, tmp_path, sbatch_file, f"output_dir={out}", nodes=1, wait=False,
                                    env=env), config, out)
    for sbatch_file, (job_id, config, out) in jobs.items():
        info = slurm_cluster.wait_for(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=240)
        log = job_log(tmp_path, job_id)
        assert (info["JobState"], info["ExitCode"], info["NumNodes"]) == ("COMPLETED", "0:0", "1"), log[-3000:]
        assert "0: launch: node 0 of 1 (" in log and "1 CPU (gloo) process(es) per node, 1 in all" in log
        assert f"--config_file {config} --num_machines 1 --num_processes 1 --machine_rank 0" in log
        assert (out / "started.rank0.attempt0").exists()


def test_signalled_job_is_requeued_and_finishes(slurm_cluster, tmp_path):
    """The preemption plumbing, end to end with a stand-in training script: scancel --signal=USR1 reaches
    the training processes on both nodes, they exit 75, the job requeues itself (same job id, same log,
    same output_dir) and its second attempt finishes."""
    out = tmp_path / "run"
    job_id = submit(slurm_cluster, tmp_path, "train_multinode.sbatch", f"output_dir={out}", wait=False,
                    env={"TRAIN_SCRIPT": str(WORKER)})
    deadline = time.monotonic() + 180
    while not all((out / f"started.rank{r}.attempt0").exists() for r in (0, 1)):
        info = slurm_cluster.job(job_id)
        assert info["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), info
        assert time.monotonic() < deadline, "the job's training processes did not start"
        time.sleep(0.2)
    slurm_cluster.run("scancel", "--signal=USR1", str(job_id))
    info = slurm_cluster.wait_for(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout=240)
    log = job_log(tmp_path, job_id)
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "1", "0:0"), log[-5000:]
    assert [(out / f"signalled.rank{r}").read_text() for r in (0, 1)] == ["SIGUSR1", "SIGUSR1"]
    assert all((out / f"started.rank{r}.attempt1").exists() and (out / f"finished.rank{r}").exists()
               for r in (0, 1))
    assert f"job {job_id} (restart 0)" in log and f"job {job_id} (restart 1)" in log  # --open-mode=append
    assert f"job {job_id}: preempted (status 75), requeueing" in log
    assert "training.resume_from=auto" in log  # every attempt resumes from output_dir's newest checkpoint


def last_logged_step(out) -> int:
    """The highest step in metrics.jsonl so far (0 before it exists); a half-written last line is skipped."""
    path = out / "metrics.jsonl"
    steps = [0]
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(json.loads(line).get("step", 0))
        except ValueError:
            pass
    return max(steps)


def test_preempted_training_resumes_and_matches_uninterrupted(slurm_cluster, two_node_run, tmp_path):
    """The real loop, preempted mid-run on 2 nodes and requeued, ends with the uninterrupted run's adapter."""
    reference, _, _, args = two_node_run
    out = tmp_path / "preempted"
    job_id = submit(slurm_cluster, tmp_path, "train_multinode.sbatch", f"output_dir={out}", *args, wait=False)
    deadline = time.monotonic() + 300
    while last_logged_step(out) < 6:
        assert slurm_cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING")
        assert time.monotonic() < deadline, "the job did not reach step 6"
        time.sleep(0.2)
    slurm_cluster.run("scancel", "--signal=USR1", str(job_id))
    info = slurm_cluster.wait_for(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout=600)
    log = job_log(tmp_path, job_id)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), log[-5000:]
    assert f"job {job_id}: preempted (status 75), requeueing" in log
    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert steps == list(range(1, PREEMPT_STEPS + 1))  # resumed where it stopped: no repeated or missing steps
    assert json.loads((out / "summary.json").read_text())["num_processes"] == 2
    ref, got = load_adapter_tensors(reference), load_adapter_tensors(out)
    assert ref.keys() == got.keys() and len(ref) > 0
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-6, msg=key)
