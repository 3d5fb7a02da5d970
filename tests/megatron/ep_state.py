"""Run with torchrun on 2 gloo ranks (megatron-core through the test-only CPU shim): the megatron backend built with
the moe plugin at expert_parallel 2. Prints one JSON line on rank 0: whether `full_state_dict` equals the
single-process build from the same seed bitwise (names and whole tensors), the experts this rank holds, and the share
`expert_shards` describes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_shim  # noqa: E402

cpu_shim.install()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from slimtrain.modules.plugin_stack import PluginStack  # noqa: E402
from slimtrain.trainer.backends.build import ModelInit, build_model  # noqa: E402
from slimtrain.trainer.recipe.schema import load_recipe  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MOE = "plugins=[{type: moe, num_experts: 4, top_k: 2, expert_intermediate_size: 32, num_shared_experts: 1}]"


def main() -> None:
    from slimtrain.trainer.backends.megatron.backend import MegatronBackend

    dist.init_process_group("gloo")
    recipe = load_recipe(REPO / "recipes" / "tiny-cpu.yaml",
                         [MOE, "model.vocab_size=512", "backend={type: megatron, expert_parallel: 2, precision: fp32}"])
    backend = MegatronBackend(recipe.backend, recipe.train, recipe.optim)
    model = backend.build_model(recipe.model, PluginStack.from_configs(recipe.plugins), ModelInit(seed=3))
    full = backend.full_state_dict()
    whole = build_model(recipe.model, PluginStack.from_configs(recipe.plugins), ModelInit(seed=3),
                        torch.device("cpu")).state_dict()
    shard = backend.expert_shards().get("layers.1.mlp.experts.gate_up")
    result = {"equal": full.keys() == whole.keys() and all(torch.equal(full[k], whole[k].to(full[k].dtype))
                                                            for k in whole),
              "held": model.layers[1].mlp.experts.gate_up.shape[0],
              "shard": None if shard is None else [shard.dim, shard.rank, shard.size, list(shard.full_shape)]}
    if dist.get_rank() == 0:
        print(json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # no interpreter teardown: see tests/trainer/sp_parity.py


if __name__ == "__main__":
    main()
