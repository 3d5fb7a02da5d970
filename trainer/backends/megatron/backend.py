"""The megatron-core backend: its `parallel_state` groups, tensor-parallel layers (tensor_parallel.py), DDP and
optimizer (`get_megatron_optimizer`, with the distributed optimizer as an option), behind the Backend protocol.

Built: tensor (with megatron's sequence parallelism, sequence_parallel.py), pipeline (1F1B and interleaved,
pipeline.py), data and expert parallelism (experts.py), the moe and qat plugins (qat.py), fp32 and bf16, gradient
accumulation and clipping, the same learning-rate schedules and no-decay groups as the DeepSpeed backend,
`dist_checkpointing` checkpoints that reshard on load (checkpoint.py), branching (branch.py), export. What is not
built yet is refused by its config (docs/backends.md).
"""

from __future__ import annotations

import math
import warnings
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
from slimtrain.trainer.backends.megatron import checkpoint
from slimtrain.trainer.backends.megatron import experts as megatron_experts
from slimtrain.trainer.backends.megatron.config import MegatronConfig
from slimtrain.trainer.backends.megatron.pipeline import (StageModule, chunk_views, cut, forward_step_func,
                                                          held_stages, row_slice)
from slimtrain.trainer.backends.megatron.sequence_parallel import mark_partial_gradients
from slimtrain.trainer.backends.megatron.tensor_parallel import (check_marked, parallelize,
                                                                 vocab_parallel_cross_entropy_sum)
from slimtrain.trainer.recipe.schema import OptimConfig, TrainConfig

class MegatronBackend:
    """megatron-core's groups, layers, DDP and optimizer around our model."""

    def __init__(self, cfg: MegatronConfig, train: TrainConfig, optim: OptimConfig) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.model_parallel_config import ModelParallelConfig

        self.cfg, self.optim_cfg = cfg, optim
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        cfg.data_parallel_size(self.world_size)  # refuses a world the layout does not tile
        self.chunks = cfg.virtual_stages or 1  # model chunks per pipeline rank (interleaved schedule when > 1)
        # Expert groups within one tensor-parallel rank (expert-tensor size = tensor size): see experts.py.
        ps.initialize_model_parallel(tensor_model_parallel_size=cfg.tensor_parallel,
                                     pipeline_model_parallel_size=cfg.pipeline_parallel,
                                     virtual_pipeline_model_parallel_size=self.chunks if self.chunks > 1 else None,
                                     expert_model_parallel_size=cfg.expert_parallel,
                                     expert_tensor_parallel_size=cfg.tensor_parallel)
        self.ps = ps
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp_rank, self.pp = ps.get_pipeline_model_parallel_rank(), cfg.pipeline_parallel
        self.held = held_stages(self.pp_rank, self.pp, self.chunks)  # this rank's (virtual) stages
        self.last_stage = self.pp_rank == self.pp - 1
        self.process_groups: dict[str, Any] = {"data": ps.get_data_parallel_group(),
                                               "tensor": ps.get_tensor_model_parallel_group(),
                                               "pipeline": ps.get_pipeline_model_parallel_group()}
        self.ep, self.ep_rank = cfg.expert_parallel, ps.get_expert_model_parallel_rank()
        if self.ep > 1:
            self.process_groups.update(megatron_experts.process_groups(ps))
        self.comm = TorchCommunicator(self.process_groups)
        self.cross_entropy = vocab_parallel_cross_entropy_sum if cfg.tensor_parallel > 1 else None
        self.grad_accum = train.grad_accum(self.dp_size)
        if self.chunks > 1 and self.grad_accum % self.pp:
            from slimtrain.trainer.errors import RecipeError

            raise RecipeError(f"backend.virtual_stages={self.chunks}: the interleaved schedule runs the micro-batches in "
                              f"groups of pipeline_parallel={self.pp}, but a step has {self.grad_accum} (train."
                              f"global_batch_size / micro_batch_size / {self.dp_size} data-parallel replicas); make it "
                              f"a multiple of {self.pp}")
        self.bf16 = cfg.precision == "bf16"
        self.parallel_config = ModelParallelConfig(
            tensor_model_parallel_size=cfg.tensor_parallel, use_cpu_initialization=True, perform_initialization=False,
            gradient_accumulation_fusion=False, params_dtype=torch.float32, sequence_parallel=cfg.sequence_parallel)
        self.model: nn.Module | None = None
        self.built_from: Path | None = None  # the branch source the build initialised plugins' parameters from
        self.consumed: frozenset[str] = frozenset()  # and the source parameters they consumed
        self.ddp = None  # the first (with interleaving: one per model chunk in `ddps`) megatron DDP module
        self.ddps: list = []
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
        built = build(model_cfg, plugins, init, self.device, self._parallelize)
        self.model, self.built_from, self.consumed = built.model, init.branch_from, built.consumed
        check_marked(self.model, self.cfg.tensor_parallel)
        if self.cfg.sequence_parallel:
            mark_partial_gradients(self.model)
        if self.ep > 1:
            megatron_experts.mark(self.model)  # after materialisation, before DDP (setup)
        if self.pp > 1:  # built whole from the seed (or imported), then cut: each stage holds the dense weights
            cut(self.model, self.held, self.pp * self.chunks)
        return self.model

    def _parallelize(self, model: nn.Module) -> None:
        """The build's parallelisation step (meta model): tensor-parallel layers, then this rank's share of the
        experts."""
        # Not under a meta-device context: materialising a meta parameter makes a new one, without the slice marks.
        parallelize(model, self.parallel_config, self.tp_rank, self.cfg.tensor_parallel)
        if self.ep > 1:
            megatron_experts.shard(model, self.comm, self.ep_rank, self.ep)

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> None:
        """megatron's DDP around the model and its optimizer over the same decay/no-decay groups as `optimizer`
        (built by the trainer: its groups and `scheduler`'s learning rates are followed, it never steps)."""
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        if self.bf16:
            model.to(torch.bfloat16)
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                   use_distributed_optimizer=self.cfg.distributed_optimizer)
        config = self._transformer_config(model.cfg)
        stages = self.pp * self.chunks
        if self.pp == 1:
            modules = [model]
        else:
            views = chunk_views(model, self.held, stages)
            modules = [StageModule(view, s == 0, s == stages - 1) for view, s in zip(views, self.held)]
        self.ddps = [DistributedDataParallel(config, ddp_config, m) for m in modules]
        self.ddp = self.ddps[0]
        if self.pp > 1:  # what megatron's schedule calls around the micro-batches
            from megatron.core.distributed import finalize_model_grads

            no_sync = [d.no_sync for d in self.ddps]
            config.no_sync_func = no_sync if self.chunks > 1 else no_sync[0]
            config.finalize_model_grads_func = finalize_model_grads
        self.optimizer = self._optimizer(optimizer)
        self.scheduler = scheduler

    def _transformer_config(self, cfg: ModelConfig) -> Any:
        from megatron.core.transformer import TransformerConfig

        dtype = torch.bfloat16 if self.bf16 else torch.float32
        interleaved = {} if self.chunks == 1 else {
            "virtual_pipeline_model_parallel_size": self.chunks,
            # Interleaved at two stages, batched p2p exchanges silently give wrong activations and gradients (a known
            # megatron-core bug; ../shared/reference notes); the unbatched exchanges are exact.
            "batch_p2p_comm": self.pp != 2}
        return TransformerConfig(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                                 num_attention_heads=cfg.num_heads, tensor_model_parallel_size=self.cfg.tensor_parallel,
                                 pipeline_model_parallel_size=self.pp, pipeline_dtype=dtype, **interleaved,
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
        return get_megatron_optimizer(config, self.ddps, config_overrides={key: ParamGroupOverride(wd_mult=0.0)})

    def train_step(self, micro_batches: list[Batch], loss_fn: LossFn) -> StepResult:
        """Forward/backward every micro-batch, then megatron's optimizer step. As on the DeepSpeed backend, each
        micro-batch's loss is divided by the micro-batch count before its backward (so that plugins' loss terms are
        averaged over micro-batches) and its token losses are normalised by the global label count divided by
        data-parallel size x micro-batches: megatron's DDP averages gradients over the data-parallel ranks."""
        if len(micro_batches) != self.grad_accum:
            raise ValueError(f"expected {self.grad_accum} micro-batches per step, got {len(micro_batches)}")
        local_labels = sum(b.num_label_tokens for b in micro_batches)
        local_tokens = sum(b.num_tokens for b in micro_batches)
        global_labels, global_tokens = self.all_reduce_sum([local_labels, local_tokens], group="data")
        norm = max(global_labels, 1.0) / (self.dp_size * self.grad_accum)
        for ddp in self.ddps:
            ddp.zero_grad_buffer()
            ddp.train()
        self.optimizer.zero_grad()
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
            with warnings.catch_warnings():  # the trainer's torch optimizer never steps here: megatron's does
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\(\)`")
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
            (loss / len(micro_batches)).backward()  # what megatron's schedule does with stages
            loss_sum += token_loss_sum.detach().double()
            for name, value in terms.items():
                term_sums[name] = term_sums.get(name, 0.0) + value.detach().double() / len(micro_batches)
        finalize_model_grads([self.ddp])
        return loss_sum, term_sums

    def _pipelined(self, micro_batches: list[Batch], loss_fn: LossFn, norm: float, forward_only: bool
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """megatron's pipeline schedule (1F1B, or interleaved) over the micro-batches (it reduces the gradients at its
        end); the token-loss sum on the last stage, zero elsewhere, and the plugins' terms under the same names on
        every stage (zero where none is computed): the sums over the ranks that follow need equal lists."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        sums: dict[str, Any] = {}
        rows, seq = micro_batches[0].input_ids.shape
        get_forward_backward_func()(
            forward_step_func=forward_step_func(loss_fn, norm, self.device, sums),
            data_iterator=[iter(micro_batches) for _ in self.ddps] if self.chunks > 1 else iter(micro_batches),
            model=self.ddps, num_microbatches=len(micro_batches),
            seq_length=seq, micro_batch_size=rows, forward_only=forward_only)
        loss_sum = torch.as_tensor(sums.get("loss", 0.0), dtype=torch.float64, device=self.device)
        terms = {k: v / len(micro_batches) for k, v in sums.get("terms", {}).items()}
        names = [sorted(terms)]
        dist.broadcast_object_list(names, src=self.ps.get_pipeline_model_parallel_last_rank(),
                                   group=self.process_groups["pipeline"])
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        return loss_sum, {k: terms.get(k, zero) for k in names[0]}

    def _pipelined_eval(self, batch: Batch, loss_fn: LossFn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One batch through the pipeline, forward only. The interleaved schedule takes micro-batches in groups of
        the pipeline size: the batch's rows are split into that many pieces when they divide, else the batch is run
        that many times (its sums then averaged)."""
        if self.chunks == 1:
            return self._pipelined([batch], loss_fn, 1.0, forward_only=True)
        rows = batch.input_ids.shape[0]
        if rows % self.pp == 0:
            pieces = [row_slice(batch, i * rows // self.pp, (i + 1) * rows // self.pp) for i in range(self.pp)]
            return self._pipelined(pieces, loss_fn, 1.0, forward_only=True)
        loss_sum, terms = self._pipelined([batch] * self.pp, loss_fn, 1.0, forward_only=True)
        return loss_sum / self.pp, terms

    @torch.no_grad()
    def eval_step(self, batch: Batch, loss_fn: LossFn) -> tuple[float, int, dict[str, float]]:
        """This rank's share of one micro-batch's (token loss sum, label tokens, terms): the ranks of a
        tensor-parallel group compute the same replica's numbers, so each reports 1/tp of them and the trainer's
        sum over all ranks counts every replica once."""
        for ddp in self.ddps:
            ddp.eval()
        tp = self.cfg.tensor_parallel
        if self.pp > 1:  # only the last stage has a loss: the others report none
            token_loss_sum, terms = self._pipelined_eval(batch, loss_fn)
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
        """Collective: megatron-core's `dist_checkpointing` of the model and optimizer slices (checkpoint.py)."""
        checkpoint.save(self, directory)

    def expert_shards(self) -> dict[str, Shard]:
        """This rank's expert parameters and the share of the whole [num_experts, ...] tensor each holds (dim 0,
        expert rank, expert-parallel size); empty at expert_parallel 1."""
        return megatron_experts.expert_shards(self.model, self.ep_rank, self.ep)

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers by name (a tied head listed under its name too; a plugin's buffers may be slices)."""
        return {**dict(self.model.named_parameters(remove_duplicate=False)),
                **dict(self.model.named_buffers(remove_duplicate=False))}

    def load(self, directory: Path) -> None:
        """Collective: restore a checkpoint written at any tensor, pipeline and data-parallel layout."""
        checkpoint.load(self, directory)

    def branch(self, directory: Path, scratch: Path) -> list[str]:
        """Collective: start from another megatron run's checkpoint under this recipe (branch.py); `scratch` is not
        needed (dist_checkpointing reads any layout directly). Returns this rank's fresh parameters."""
        from slimtrain.trainer.backends.megatron.branch import branch

        return branch(self, directory)

    def consumed_from(self, directory: Path) -> frozenset[str]:
        """The source parameters the build's plugins consumed (upcycling), provided the build read `directory`."""
        if self.consumed and (self.built_from is None or Path(directory).resolve() != Path(self.built_from).resolve()):
            from slimtrain.trainer.errors import RecipeError

            raise RecipeError(f"checkpoint.branch_from: the model's new parameters were initialised from "
                              f"{self.built_from} but the branch loads {directory}; start the run again, or name a "
                              "step directory in checkpoint.branch_from")
        return self.consumed

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
        experts = self.expert_shards()
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
            if name in experts:  # each rank holds 1/ep of the experts: joined along dim 0 over the expert group
                tensor = megatron_experts.gather(tensor, experts[name], self.process_groups["expert"])
            out[name] = tensor.detach().float().cpu() if tensor.is_floating_point() else tensor.cpu()
        return out

