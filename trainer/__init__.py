"""slimtrain.trainer: the run (config, backends, loop, checkpoint, logging, export, CLI)."""
