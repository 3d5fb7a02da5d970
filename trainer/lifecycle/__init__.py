"""A run's lifecycle: assembly, the loop, checkpoints, branching, signals and preemption."""
