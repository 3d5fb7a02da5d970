"""The megatron-core backend: its `parallel_state` groups, tensor-parallel layers (tensor_parallel.py), DDP and
optimizer (`get_megatron_optimizer`, with the distributed optimizer as an option), behind the Backend protocol.

Built so far: tensor (with megatron's sequence parallelism), pipeline (1F1B) and data parallelism, fp32 and bf16,
gradient accumulation and clipping, the same learning-rate schedules and no-decay groups as the DeepSpeed backend,
exact resume at the same layout, export, the QAT plugin. Interleaved pipelines, expert parallelism, other plugins, and
resharded `dist_checkpointing` checkpoints are refused by its config until they are built (docs/backends.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from slimtrain.data.batch import Batch
from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.transformer.config import ModelConfig
from slimtrain.modules.transformer.sharding import Shard, shard_of
from slimtrain.trainer.backends.base import LossFn, StepResult
from slimtrain.trainer.backends.build import ModelInit, build
from slimtrain.trainer.backends.communicator import TorchCommunicator
from slimtrain.trainer.backends.megatron.config import MegatronConfig
from slimtrain.trainer.backends.megatron.pipeline import StageModule, cut, forward_step_func
from slimtrain.trainer.backends.megatron.sequence_parallel import mark_partial_gradients
from slimtrain.trainer.backends.megatron.tensor_parallel import parallelize, vocab_parallel_cross_entropy_sum
from slimtrain.trainer.recipe.schema import OptimConfig, TrainConfig

MEGATRON_DIR = "megatron"  # sub-directory of a checkpoint step directory that holds this backend's files
LAYOUT = "layout.json"


class MegatronBackend:
    """megatron-core's groups, layers, DDP and optimizer around our model."""

    def __init__(self, cfg: MegatronConfig, train: TrainConfig, optim: OptimConfig) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.model_parallel_config import ModelParallelConfig

        self.cfg, self.optim_cfg = cfg, optim
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        cfg.data_parallel_size(self.world_size)  # refuses a world the layout does not tile
        ps.initialize_model_parallel(tensor_model_parallel_size=cfg.tensor_parallel,
                                     pipeline_model_parallel_size=cfg.pipeline_parallel)
        self.ps = ps
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp_rank, self.pp = ps.get_pipeline_model_parallel_rank(), cfg.pipeline_parallel
        self.first_stage, self.last_stage = self.pp_rank == 0, self.pp_rank == self.pp - 1
        self.process_groups: dict[str, Any] = {"data": ps.get_data_parallel_group(),
                                               "tensor": ps.get_tensor_model_parallel_group(),
                                               "pipeline": ps.get_pipeline_model_parallel_group()}
        self.comm = TorchCommunicator(self.process_groups)
        self.cross_entropy = vocab_parallel_cross_entropy_sum if cfg.tensor_parallel > 1 else None
        self.grad_accum = train.grad_accum(self.dp_size)
        self.bf16 = cfg.precision == "bf16"
        self.parallel_config = ModelParallelConfig(
            tensor_model_parallel_size=cfg.tensor_parallel, use_cpu_initialization=True, perform_initialization=False,
            gradient_accumulation_fusion=False, params_dtype=torch.float32, sequence_parallel=cfg.sequence_parallel)
        self.model: nn.Module | None = None
        self.ddp = None
        self.optimizer = None
        self.scheduler = None
        self.steps_done = 0

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index (the ranks of a tensor-parallel group read the same rows)."""
        return self.ps.get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    @property
    def module(self) -> nn.Module:
        return self.model

    @property
    def device(self) -> torch.device:
        """Where batches must be moved."""
        from slimtrain.trainer.env.distributed import rank_device

        return rank_device()

    def build_model(self, model_cfg: ModelConfig, plugins: PluginStack, init: ModelInit) -> nn.Module:
        """The model with megatron's tensor-parallel layers in place of the projections, embedding and head."""
        tp = self.cfg.tensor_parallel
        split = (lambda model: parallelize(model, self.parallel_config, self.tp_rank, tp))
        self.model = build(model_cfg, plugins, init, self.device, split).model
        if self.cfg.sequence_parallel:
            mark_partial_gradients(self.model)
        if self.pp > 1:  # built whole from the seed (or imported), then cut: each stage holds the dense weights
            cut(self.model, self.pp_rank, self.pp)
        return self.model

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> None:
        """megatron's DDP around the model and its optimizer over the same decay/no-decay groups as `optimizer`
        (built by the trainer: its groups and `scheduler`'s learning rates are followed, it never steps)."""
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        if self.bf16:
            model.to(torch.bfloat16)
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                   use_distributed_optimizer=self.cfg.distributed_optimizer)
        config = self._transformer_config(model.cfg)
        module = model if self.pp == 1 else StageModule(model, self.first_stage, self.last_stage)
        self.ddp = DistributedDataParallel(config, ddp_config, module)
        if self.pp > 1:  # what megatron's schedule calls around the micro-batches
            from megatron.core.distributed import finalize_model_grads

            config.no_sync_func = self.ddp.no_sync
            config.finalize_model_grads_func = finalize_model_grads
        self.optimizer = self._optimizer(optimizer)
        self.scheduler = scheduler

    def _transformer_config(self, cfg: ModelConfig) -> Any:
        from megatron.core.transformer import TransformerConfig

        dtype = torch.bfloat16 if self.bf16 else torch.float32
        return TransformerConfig(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                                 num_attention_heads=cfg.num_heads, tensor_model_parallel_size=self.cfg.tensor_parallel,
                                 pipeline_model_parallel_size=self.pp, pipeline_dtype=dtype,
                                 use_cpu_initialization=True, perform_initialization=False,
                                 gradient_accumulation_fusion=False, bf16=self.bf16, params_dtype=torch.float32,
                                 sequence_parallel=self.cfg.sequence_parallel)

    def _optimizer(self, torch_optimizer: torch.optim.Optimizer) -> Any:
        from megatron.core.optimizer import OptimizerConfig, ParamGroupOverride, get_megatron_optimizer
        from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate

        o = self.optim_cfg
        no_decay = {id(p) for g in torch_optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
        config = OptimizerConfig(optimizer="adam", lr=o.lr, weight_decay=o.weight_decay, adam_beta1=o.betas[0],
                                 adam_beta2=o.betas[1], adam_eps=o.eps, clip_grad=o.grad_clip or 0.0, bf16=self.bf16,
                                 params_dtype=torch.float32, use_distributed_optimizer=self.cfg.distributed_optimizer)
        # The trainer's groups: matrices decay; norms, biases and embeddings do not (DeepSpeed backend's groups).
        key = ParamKey(predicate=ParamPredicate(name="slimtrain_no_decay", fn=lambda p: id(p) in no_decay))
        return get_megatron_optimizer(config, [self.ddp], config_overrides={key: ParamGroupOverride(wd_mult=0.0)})

    def train_step(self, micro_batches: list[Batch], loss_fn: LossFn) -> StepResult:
        """Forward/backward every micro-batch, then megatron's optimizer step. The loss is normalised by the global
        label count: megatron's DDP averages gradients over the data-parallel ranks and sums micro-batches."""
        if len(micro_batches) != self.grad_accum:
            raise ValueError(f"expected {self.grad_accum} micro-batches per step, got {len(micro_batches)}")
        local_labels = sum(b.num_label_tokens for b in micro_batches)
        local_tokens = sum(b.num_tokens for b in micro_batches)
        global_labels, global_tokens = self.all_reduce_sum([local_labels, local_tokens], group="data")
        norm = max(global_labels, 1.0) / self.dp_size
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.ddp.train()
        if self.pp > 1:
            loss_sum, term_sums = self._pipelined(micro_batches, loss_fn, norm, forward_only=False)
        else:
            loss_sum, term_sums = self._micro_batches(micro_batches, loss_fn, norm)
        lr = float(self.scheduler.get_last_lr()[0])
        for group in self.optimizer.param_groups:  # what megatron's own scheduler would set, from ours
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.optim_cfg.weight_decay * group.get("wd_mult", 1.0)
        applied, grad_norm, _ = self.optimizer.step()
        if applied:
            self.scheduler.step()
            self.steps_done += 1
        # The last stage's tensor-parallel ranks each hold the replica's sums: 1/tp of them from each, over all ranks.
        local = (torch.stack([loss_sum, *term_sums.values()]) / self.cfg.tensor_parallel).tolist()
        total, *extra_vals = self.all_reduce_sum(local)
        grad_norm = float(grad_norm) if grad_norm is not None else None
        return StepResult(loss=total / max(global_labels, 1.0), tokens=int(global_tokens),
                          grad_norm=grad_norm if grad_norm is None or math.isfinite(grad_norm) else float("nan"),
                          lr=lr, applied=bool(applied),
                          extras={k: v / self.dp_size for k, v in zip(term_sums, extra_vals)})

    def _micro_batches(self, micro_batches: list[Batch], loss_fn: LossFn, norm: float
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of each micro-batch in turn (no pipeline); then megatron's gradient reduction (over
        the data-parallel ranks, and the sequence-parallel norms' over the tensor-parallel group)."""
        from megatron.core.distributed import finalize_model_grads

        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        term_sums: dict[str, torch.Tensor] = {}
        for batch in micro_batches:
            loss, token_loss_sum, terms = loss_fn(self.ddp, batch.to(self.device), norm)
            loss.backward()
            loss_sum += token_loss_sum.detach().double()
            for name, value in terms.items():
                term_sums[name] = term_sums.get(name, 0.0) + value.detach().double() / len(micro_batches)
        finalize_model_grads([self.ddp])
        return loss_sum, term_sums

    def _pipelined(self, micro_batches: list[Batch], loss_fn: LossFn, norm: float, forward_only: bool
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """megatron's 1F1B schedule over the micro-batches (it reduces the gradients at its end); the token-loss sum
        on the last stage, zero elsewhere."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        sums: dict[str, Any] = {}
        rows, seq = micro_batches[0].input_ids.shape
        get_forward_backward_func()(
            forward_step_func=forward_step_func(loss_fn, norm, len(micro_batches), self.device, sums),
            data_iterator=iter(micro_batches), model=[self.ddp], num_microbatches=len(micro_batches),
            seq_length=seq, micro_batch_size=rows, forward_only=forward_only)
        loss_sum = torch.as_tensor(sums.get("loss", 0.0), dtype=torch.float64, device=self.device)
        terms = {k: v / len(micro_batches) for k, v in sums.get("terms", {}).items()}
        return loss_sum, terms

    @torch.no_grad()
    def eval_step(self, batch: Batch, loss_fn: LossFn) -> tuple[float, int, dict[str, float]]:
        """This rank's share of one micro-batch's (token loss sum, label tokens, terms): the ranks of a
        tensor-parallel group compute the same replica's numbers, so each reports 1/tp of them and the trainer's
        sum over all ranks counts every replica once."""
        self.ddp.eval()
        tp = self.cfg.tensor_parallel
        if self.pp > 1:  # only the last stage has a loss: the others report none
            token_loss_sum, terms = self._pipelined([batch], loss_fn, 1.0, forward_only=True)
            labels = batch.num_label_tokens if self.last_stage else 0
        else:
            _, token_loss_sum, terms = loss_fn(self.ddp, batch.to(self.device), 1.0)
            labels = batch.num_label_tokens
        return float(token_loss_sum) / tp, labels / tp, {k: float(v) for k, v in terms.items()}

    def all_reduce_sum(self, values: list[float], group: str | None = None) -> list[float]:
        """Element-wise sum over all ranks (or over the named process group), in float64."""
        t = torch.tensor(values, dtype=torch.float64)
        if torch.cuda.is_available() and dist.get_backend() == "nccl":
            t = t.to(self.device)
        dist.all_reduce(t, group=None if group is None else self.process_groups[group])
        return t.cpu().tolist()

    def barrier(self) -> None:
        dist.barrier()

    def save(self, directory: Path) -> None:
        """Each rank writes its model slice, optimizer and scheduler state; rank 0 the layout (how to join them)."""
        out = directory / MEGATRON_DIR
        out.mkdir(parents=True, exist_ok=True)
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "steps_done": self.steps_done, "shards": self.shards()}
        torch.save(state, out / f"rank_{self.rank:05d}.pt")
        coords = [None] * self.world_size
        dist.all_gather_object(coords, (self.dp_rank, self.tp_rank, self.pp_rank))
        if self.rank == 0:
            layout = {"tensor_parallel": self.cfg.tensor_parallel, "pipeline_parallel": self.pp,
                      "world_size": self.world_size,
                      "replica_0": [r for r, (dp, _, _) in enumerate(coords) if dp == 0]}
            (out / LAYOUT).write_text(json.dumps(layout, indent=1))

    def shards(self) -> dict[str, dict | None]:
        """Per tensor of this rank, the tensor-parallel slice it holds (`Shard`'s fields; None: whole on every rank)."""
        return {n: (asdict(s) if (s := shard_of(t)) is not None else None) for n, t in self._tensors().items()}

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers by name (a tied head listed under its name too; a plugin's buffers may be slices)."""
        return {**dict(self.model.named_parameters(remove_duplicate=False)),
                **dict(self.model.named_buffers(remove_duplicate=False))}

    def load(self, directory: Path) -> None:
        """Restore what `save` wrote, at the same layout (checked before launch)."""
        state = torch.load(directory / MEGATRON_DIR / f"rank_{self.rank:05d}.pt", map_location="cpu",
                           weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps_done = state["steps_done"]

    def branch(self, directory: Path, scratch: Path) -> list[str]:
        raise NotImplementedError("checkpoint.branch_from is not built for the megatron backend yet")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Whole fp32 tensors in the model's own names: each tensor-parallel slice joined over its group, and (with
        pipeline stages) every stage's tensors gathered."""
        own = self._stage_state_dict()
        if self.pp == 1:
            return own
        stages: list = [None] * self.pp
        dist.all_gather_object(stages, own, group=self.process_groups["pipeline"])
        return {k: v for stage in stages for k, v in stage.items()}

    def _stage_state_dict(self) -> dict[str, torch.Tensor]:
        group = self.process_groups["tensor"]
        tensors = self._tensors()
        out = {}
        for name, tensor in self.model.state_dict().items():
            if not isinstance(tensor, torch.Tensor):  # megatron's `_extra_state` entries
                continue
            held = tensors.get(name)
            shard = None if held is None else shard_of(held)
            if shard is not None:
                parts = [torch.empty_like(tensor) for _ in range(shard.size)]
                dist.all_gather(parts, tensor.contiguous(), group=group)
                tensor = shard.join(parts)
            out[name] = tensor.detach().float().cpu() if tensor.is_floating_point() else tensor.cpu()
        return out


def read_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """The whole fp32 weights of a megatron checkpoint, read offline: the ranks of data-parallel replica 0 (every
    pipeline stage, every tensor-parallel slice), each tensor's slices joined along the dim its rank files name."""
    root = step_dir / MEGATRON_DIR
    layout = json.loads((root / LAYOUT).read_text())
    pieces: dict[str, list[torch.Tensor]] = {}
    shards: dict[str, dict | None] = {}
    for r in layout["replica_0"]:  # in rank order: tensor-parallel slices of a stage are consecutive ranks
        saved = torch.load(root / f"rank_{r:05d}.pt", map_location="cpu", weights_only=False)
        shards.update(saved["shards"])
        for name, tensor in saved["model"].items():
            if isinstance(tensor, torch.Tensor):  # megatron's layers keep an `_extra_state` entry (None) of their own
                pieces.setdefault(name, []).append(tensor)
    out = {}
    for name, parts in pieces.items():
        shard = shards.get(name)
        whole = parts[0] if shard is None else Shard(**shard).join(parts)
        out[name] = whole.float() if whole.is_floating_point() else whole
    return out
