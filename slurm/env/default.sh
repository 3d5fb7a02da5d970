# Environment for GPU clusters, sourced by the batch script (slurm/train.sbatch) before the launch.
# Copy this file to slurm/env/<cluster>.sh, adapt it, and launch with `--env <cluster>`.

# Modules, if the cluster uses them (uncomment and adapt):
# module purge
# module load cuda/12.4 nccl

# Activate the environment slimtrain is installed in, if the login shell does not:
# source /path/to/slimtrain/.venv/bin/activate

# NCCL: report problems once per job, not per collective; keep failures loud.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# The interface that carries inter-node traffic (ib0, eth0, ...); by default NCCL chooses.
# export NCCL_SOCKET_IFNAME=ib0
# InfiniBand HCAs to use, if the node has several:
# export NCCL_IB_HCA=mlx5

# One OpenMP thread per process unless the cluster says otherwise: GPUs do the work.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
