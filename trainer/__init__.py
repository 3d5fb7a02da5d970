"""slimtrain.trainer: the run, laid out by job.

    recipe/     the recipe: schema (pydantic), loading (`extends:`, overrides), the generated reference
    loss/       the language-modelling loss through the plugins, chunked and fused cross-entropy
    lifecycle/  assembling a run, the loop, checkpoints, branching, signals, preemption
    backends/   the engines (DeepSpeed) behind one protocol, their registry, the model build
    env/        distributed start-up and device binding, memory estimates
    export/     Hugging Face export, --verify, init_from_hf
    launch/     cluster launchers (SLURM)
    testing/    fault injection for tests (SLIMTRAIN_FAULT)
    optim.py  logging.py  errors.py  cli.py  quickstart.py
"""
