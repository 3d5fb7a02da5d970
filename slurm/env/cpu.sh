# Environment for CPU-only nodes (the local test cluster of slurm/local-cluster.sh, CI).
# The trainer uses the gloo backend and DeepSpeed's CPU accelerator when no GPU is visible.

export DS_ACCELERATOR=cpu
# Several ranks share a node's cores: one thread each keeps them from oversubscribing it.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# gloo picks the interface its host name resolves to; set it when that is not the cluster network.
# export GLOO_SOCKET_IFNAME=eth0
