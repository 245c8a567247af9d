#!/usr/bin/env bash
# The body the sbatch files in this folder share (not a batch script itself): start one launcher per
# node with srun, then requeue the job if its run was preempted after saving a checkpoint (status 75).
# Run from the repository root inside an allocation:
#   scripts/slurm/job.sh ACCELERATE_CONFIG [--config RECIPE] [KEY=VALUE ...]
# Environment:
#   PYTHON         the interpreter with phi3-lora installed (default: python3)
#   RESUME_FROM    training.resume_from given before your overrides (default: auto = the newest complete
#                  checkpoint in output_dir, else a fresh start); empty leaves it to the recipe
#   GPUS_PER_NODE  processes per node (default: the GPUs SLURM allocated, else all that CUDA sees)
#   TRAIN_SCRIPT   the training script (default: scripts/train.py); it takes the same arguments
set -uo pipefail
EX_PREEMPTED=75
accelerate_config=$1
shift
resume=()
if [ -n "${RESUME_FROM-auto}" ]; then
  resume=("training.resume_from=${RESUME_FROM-auto}")
fi
launch=(scripts/slurm/launch.py --config_file "$accelerate_config")
if [ -n "${GPUS_PER_NODE:-}" ]; then
  launch+=(--gpus_per_node "$GPUS_PER_NODE")
fi

# srun takes no --cpus-per-task from sbatch since Slurm 22.05 ("must be requested again", man srun): given here,
# the task, and the G training processes it starts, get the node's cores under CPU binding, not one core.
cpus=()
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  cpus=(--cpus-per-task="${SLURM_CPUS_PER_TASK}")
fi

echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST} at $(date -Is)"
# One task per node; each runs accelerate launch for its GPUs. Exit statuses: srun gives the highest.
srun --ntasks-per-node=1 --ntasks="${SLURM_NNODES}" ${cpus[@]+"${cpus[@]}"} --label "${PYTHON:-python3}" \
  "${launch[@]}" "${TRAIN_SCRIPT:-scripts/train.py}" ${resume[@]+"${resume[@]}"} "$@"
status=$?
if [ "$status" -eq "$EX_PREEMPTED" ]; then
  echo "job ${SLURM_JOB_ID}: preempted (status 75), requeueing at $(date -Is); it resumes from its newest checkpoint"
  scontrol requeue "${SLURM_JOB_ID}"
fi
exit "$status"
