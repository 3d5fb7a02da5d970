"""DeepSpeed backend: ZeRO 0-3, bf16/fp32, gradient accumulation and clipping, CPU (gloo) or GPU (NCCL); expert
parallelism at ZeRO-1/2 (deepspeed_experts)."""

from __future__ import annotations

import contextlib
import math
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from slimtrain.core.sentinels import IGNORE_INDEX, PAD_DOC_ID
from slimtrain.data.batch import Batch
from slimtrain.modules.expert_parallel import expert_parameter_counts
from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.transformer.config import ModelConfig
from slimtrain.trainer.backends.base import LossFn, StepResult
from slimtrain.trainer.backends.build import ModelInit, build
from slimtrain.trainer.backends.communicator import TorchCommunicator
from slimtrain.trainer.backends import deepspeed_experts as experts
from slimtrain.trainer.backends.deepspeed_ulysses import create_sequence_groups, sequence_mpu
from slimtrain.trainer.backends.deepspeed_branch import (
    add_fresh_entries, drop_entries, fresh_parameters, saved_param_shapes,
)
from slimtrain.trainer.backends.deepspeed_config import check_expert_world
from slimtrain.trainer.backends.deepspeed_reshard import (
    RESHARD_DIR, UNIVERSAL_TAG, current_layout, needs_conversion, saved_buffers, saved_layout,
    universal_on_every_rank,
)
from slimtrain.trainer.recipe.schema import DeepSpeedConfig, OptimConfig, TrainConfig
from slimtrain.trainer.errors import RecipeError
from slimtrain.trainer.testing.faults import maybe_fault
from slimtrain.trainer.logging import console
from slimtrain.trainer.recipe.loading import deep_merge

DEEPSPEED_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size (elements)
DS_TAG = "ds"  # sub-directory of a checkpoint step directory that holds DeepSpeed's files


def ds_config(cfg: DeepSpeedConfig, train: TrainConfig, optim: OptimConfig, world_size: int) -> dict[str, Any]:
    """The ds_config generated from the recipe; `backend.raw` is merged over it last. `world_size`: all ranks
    (a sequence-parallel group counts as one data-parallel replica)."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    offload: dict[str, Any] = {}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        # DeepSpeed refuses a client optimizer with offloading unless told otherwise: ours (torch's fused
        # AdamW, on the CPU partitions) keeps the NaN guard and is ~3x faster than DeepSpeedCPUAdam there.
        offload = {"zero_force_ds_cpu_optimizer": False}
    conf = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum(max(world_size // cfg.sequence_parallel, 1)),
        **({"sequence_parallel_size": cfg.sequence_parallel} if cfg.sequence_parallel > 1 else {}),
        "gradient_clipping": optim.grad_clip or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        **({"data_types": {"grad_accum_dtype": "fp32"}}
           if cfg.precision == "bf16" and cfg.resolved_grad_accum_dtype() == "fp32" else {}),
        "zero_allow_untested_optimizer": True,
        **offload,
        "steps_per_print": 2**31 - 1,  # we print our own progress
        "wall_clock_breakdown": False,
    }
    return deep_merge(conf, cfg.raw)


def fit_gradient_bucket(config: dict[str, Any], num_params: int) -> dict[str, Any]:
    """`config` with ZeRO-1/2's gradient bucket no larger than the model.

    ZeRO-1/2 allocate a `reduce_bucket_size`-element buffer (DeepSpeed's default 5e8: 1 GB in bf16, 2 GB
    in fp32, per rank) whatever the model's size. A model with fewer parameters never fills it, so a bucket
    of the model's size gives the same single reduction without the unused memory. A size set in
    `backend.raw` is kept.
    """
    zero = config["zero_optimization"]
    if zero.get("stage") not in (1, 2) or "reduce_bucket_size" in zero:
        return config
    return {**config, "zero_optimization": {**zero, "reduce_bucket_size": max(1, min(DEEPSPEED_REDUCE_BUCKET, num_params))}}


class DeepSpeedBackend:
    """Wraps a single-device model into a DeepSpeed engine after it is built (seam 3)."""

    def __init__(self, cfg: DeepSpeedConfig, train: TrainConfig, optim: OptimConfig) -> None:
        self.cfg = cfg
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.config = ds_config(cfg, train, optim, self.world_size)
        self.grad_accum = self.config["gradient_accumulation_steps"]
        self.engine = None
        self.own_grad_norm = False
        # Every rank holds a replica of the model's computation: the data-parallel group is the world. With
        # expert parallelism, "expert" holds the ranks that split the experts between them and "expert_data"
        # those holding the same experts as this rank.
        self.process_groups: dict[str, Any] = {"data": None}
        self.expert_groups: experts.ExpertGroups | None = None
        if cfg.expert_parallel_size > 1:
            check_expert_world(cfg.expert_parallel_size, self.world_size)
            self.expert_groups = experts.create_groups(cfg.expert_parallel_size, dist.get_backend())
            self.process_groups.update({experts.EXPERT_GROUP: self.expert_groups.expert,
                                        experts.EXPERT_DATA_GROUP: self.expert_groups.expert_data})
        self.sequence = create_sequence_groups(cfg.sequence_parallel) if cfg.sequence_parallel > 1 else None
        if self.sequence is not None:
            self.process_groups["sequence"] = self.sequence.group
        self.comm = TorchCommunicator(self.process_groups)
        self.cross_entropy = None  # whole logits on every rank: the trainer's own loss
        # The branch source the build initialised plugins' parameters from, and the source parameters they consumed.
        self.built_from: Path | None = None
        self.consumed: frozenset[str] = frozenset()

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel replicas (what the loader shards by): the ranks of a
        sequence-parallel group are one replica and read the same rows."""
        return self.rank // self.cfg.sequence_parallel

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas (what gradient accumulation is computed from)."""
        return self.world_size // self.cfg.sequence_parallel

    @property
    def module(self) -> nn.Module:
        """The model inside the engine (with every plugin applied)."""
        return self.engine.module

    @property
    def device(self) -> torch.device:
        """Where batches must be moved."""
        from slimtrain.trainer.env.distributed import rank_device

        return rank_device()

    def build_model(self, model_cfg: ModelConfig, plugins: PluginStack, init: ModelInit) -> nn.Module:
        """The whole model on every rank (ZeRO partitions it when the engine starts, `setup`), except with
        expert parallelism: then each rank builds its share of the experts only."""
        groups = self.expert_groups
        parallelize = (lambda model: experts.shard(model, self.comm, groups)) if groups else (lambda model: None)
        built = build(model_cfg, plugins, init, self.device, parallelize)
        if groups is not None:
            experts.mark(built.model, groups)  # before the optimizer: its groups split on these marks
        built.model.sequence_shard = self.sequence  # None without sequence parallelism
        self.built_from, self.consumed = init.branch_from, built.consumed
        return built.model

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> None:
        """Create the engine; the model's parameters are partitioned/wrapped from here on."""
        import deepspeed

        from pydantic import ValidationError

        self.config = fit_gradient_bucket(self.config, sum(p.numel() for p in model.parameters()))
        if self.expert_groups is not None:
            experts.check_optimizer_groups(optimizer, model, self.expert_groups)
            experts.attach_marker(model, self.expert_groups)
        try:
            # DeepSpeed would pick cuda:LOCAL_RANK, which a task bound to one GPU does not have.
            args = SimpleNamespace(device_rank=self.device.index) if self.device.type == "cuda" else None
            self.engine, _, _, _ = deepspeed.initialize(
                args=args, model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config,
                dist_init_required=False, mpu=sequence_mpu() if self.sequence is not None else None,
            )
        except ValidationError as exc:  # DeepSpeed's own config models: only backend.raw can feed them bad values
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: got {e.get('input')!r} — {e['msg']}"
                                 for e in exc.errors())
            raise RecipeError(f"DeepSpeed refused the ds_config (the recipe's, with backend.raw merged over it): "
                              f"{problems}; fix that key under backend.raw") from None
        # ZeRO-0 in fp32 steps our optimizer unwrapped, and DeepSpeed drops the norm it clips with.
        self.own_grad_norm = self.engine.optimizer is optimizer

    def train_step(self, micro_batches: list[Batch], loss_fn: LossFn) -> StepResult:
        """Forward/backward every micro-batch, then one optimizer step.

        The loss is normalised by the label-token count of the whole global batch, so that the
        gradient is the same whatever the split into ranks and micro-batches (DeepSpeed divides by
        world size and accumulation steps; we multiply that back).
        """
        maybe_fault("slow_step", self.engine.global_steps + 1, self.rank)
        if len(micro_batches) != self.grad_accum:
            raise ValueError(f"expected {self.grad_accum} micro-batches per step, got {len(micro_batches)}")
        local_labels = sum(self._label_tokens(b) for b in micro_batches)
        local_tokens = sum(self._tokens(b) for b in micro_batches)
        global_labels, global_tokens = self.all_reduce_sum([local_labels, local_tokens])
        # DeepSpeed averages gradients over the data-parallel replicas (summing a sequence-parallel group's).
        norm = max(global_labels, 1.0) / (self.dp_size * self.grad_accum)
        lr = float(self.engine.get_lr()[0])
        # Summed on the device and read once after the last micro-batch: a read per micro-batch would
        # make the host wait for each backward before it could queue the next forward.
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        term_sums: dict[str, torch.Tensor] = {}
        self.engine.train()
        own_norm = None
        for i, batch in enumerate(micro_batches):
            loss, token_loss_sum, terms = loss_fn(self.engine, batch.to(self.device), norm)
            self.backward(loss)
            if self.own_grad_norm and i == len(micro_batches) - 1:
                own_norm = self.grad_norm()  # reduced over ranks by the last backward, not yet clipped
            self.engine.step()
            loss_sum += token_loss_sum.detach().double()
            for name, value in terms.items():
                share = value.detach().double().to(self.device) / len(micro_batches)
                term_sums[name] = term_sums.get(name, 0.0) + share
        local = torch.stack([loss_sum, *term_sums.values()]).tolist()
        total, *extra_vals = self.all_reduce_sum(local)
        extras = {k: v / self.world_size for k, v in zip(term_sums, extra_vals)}
        grad_norm = own_norm if self.own_grad_norm else self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        return StepResult(
            loss=total / max(global_labels, 1.0),
            tokens=int(global_tokens),
            grad_norm=grad_norm if grad_norm is None or math.isfinite(grad_norm) else float("nan"),
            lr=lr,
            applied=bool(self.engine.was_step_applied()),
            extras=extras,
        )

    def grad_norm(self) -> float:
        """The 2-norm of every parameter's gradient (ZeRO-0, where each rank holds them all)."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).double()))

    def backward(self, loss: torch.Tensor) -> None:
        """`engine.backward`, with the ZeRO optimizer told first whether this micro-batch ends the step.

        DeepSpeed tells it in a backward hook that it registers on the forward's output tensors, looking
        only into tensors, tuples, lists and dicts; our model returns a dataclass, so that hook never
        runs. The flag is otherwise set only after the backward, one micro-batch late, and with
        `offload_optimizer` ZeRO-2/3 read it during the backward when moving gradients to the CPU: the
        summed gradients were then wrong (0.76 relative error over 64 micro-batches, measured)."""
        optimizer = self.engine.optimizer
        if hasattr(optimizer, "set_gradient_accumulation_boundary"):
            optimizer.set_gradient_accumulation_boundary(self.engine.is_gradient_accumulation_boundary())
        self.engine.backward(loss)

    @torch.no_grad()
    def eval_step(self, batch: Batch, loss_fn: LossFn) -> tuple[float, int, dict[str, float]]:
        """(sum of token losses, label tokens, the plugins' loss terms) of one micro-batch on this rank."""
        self.engine.eval()
        _, token_loss_sum, terms = loss_fn(self.engine, batch.to(self.device), 1.0)
        return float(token_loss_sum), self._label_tokens(batch), {k: float(v) for k, v in terms.items()}

    def _label_tokens(self, batch: Batch) -> int:
        """Label tokens this rank's loss covers: its slice of the sequence under sequence parallelism."""
        if self.sequence is None:
            return batch.num_label_tokens
        return int((self.sequence.local(batch.labels) != IGNORE_INDEX).sum())

    def _tokens(self, batch: Batch) -> int:
        """Real tokens this rank computes (its slice of the sequence under sequence parallelism)."""
        if self.sequence is None:
            return batch.num_tokens
        return int((self.sequence.local(batch.doc_ids) != PAD_DOC_ID).sum())

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks, in float64 so token counts stay exact."""
        t = torch.tensor(values, dtype=torch.float64)
        if torch.cuda.is_available() and dist.get_backend() == "nccl":
            t = t.to(self.device)
        dist.all_reduce(t)
        return t.cpu().tolist()

    def barrier(self) -> None:
        dist.barrier()

    def save(self, directory: Path) -> None:
        """Every rank writes its shard of engine, optimizer and scheduler state under directory/ds."""
        self.engine.save_checkpoint(str(directory), tag=DS_TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        """Restore what `save` wrote, also from another number of ranks (converted through DeepSpeed's
        universal checkpoint, see deepspeed_reshard)."""
        self._restore(directory, fresh=[], scratch=None)

    def branch(self, directory: Path, scratch: Path) -> list[str]:
        """Start from another run's checkpoint under this run's recipe (seam 3, see trainer.branch): every
        parameter it holds with its optimizer state, the rest fresh (initial value, zero moments); the
        schedule position carries over and the learning rates follow this recipe. The source is only read;
        conversions go to `scratch`, which is removed. Returns the names of the fresh parameters.

        Source parameters the model lacks are refused, except those the plugins consumed at the build
        (`WeightInit.source`: e.g. a dense MLP the MoE plugin upcycled into experts), which are dropped
        with their optimizer state; the parameters made from them start fresh with their built values."""
        consumed = self._consumed_from(directory)
        fresh = fresh_parameters(self._saved_param_shapes(directory), self._param_shapes(), directory, consumed)
        self._restore(directory, fresh, scratch, consumed)
        return fresh

    def _consumed_from(self, directory: Path) -> frozenset[str]:
        """The source parameters the build's plugins consumed, provided the build read the same checkpoint."""
        if not self.consumed:
            return frozenset()
        if self.built_from is None or Path(directory).resolve() != Path(self.built_from).resolve():
            raise RecipeError(f"checkpoint.branch_from: the model's new parameters were initialised from "
                              f"{self.built_from} but the branch loads {directory} (the source run saved a newer "
                              "checkpoint meanwhile); start the run again, or name a step directory in "
                              "checkpoint.branch_from")
        return self.consumed

    def _restore(self, directory: Path, fresh: list[str], scratch: Path | None,
                 dropped: frozenset[str] = frozenset()) -> None:
        """Load `directory`'s DeepSpeed state into this engine: as saved when the layout matches and nothing is
        fresh or dropped, else through a universal conversion (into `scratch`, or beside the checkpoint for a
        resume) that gains an entry per fresh parameter and loses the dropped ones. Then the recipe's
        hyperparameters and the saved buffers."""
        branching = scratch is not None
        ds_dir = directory / DS_TAG
        saved = saved_layout(ds_dir)
        current = current_layout(self.config["zero_optimization"]["stage"], self.cfg.precision, self.world_size)
        recipe_hparams = self._recipe_hparams()
        saved_ep = experts.saved_expert_parallel_size(directory)
        converted = (needs_conversion(saved, current) or saved_ep != self.cfg.expert_parallel_size or bool(fresh)
                     or bool(dropped))
        if not converted:
            # A branch loads non-strictly: fresh_parameters checked every parameter; a plugin's new buffers keep their init.
            self._load_tag(directory, DS_TAG, strict=not branching)
        elif saved.optimizer == "replicated" and (fresh or dropped):
            changed = [*fresh, *sorted(dropped)]
            raise RecipeError(
                f"checkpoint.branch_from={str(directory)!r} was written at ZeRO-0, whose optimizer state has no "
                f"per-parameter form to add or drop {len(changed)} parameter(s) ({', '.join(changed[:3])}); branch "
                "from a run trained with backend.zero_stage 1, 2 or 3"
            )
        elif saved_ep > 1 or self.expert_groups is not None:
            self._load_converted_experts(directory, saved, current, saved_ep, fresh, scratch, dropped)
        else:
            self._load_converted(directory, saved, current, fresh, scratch, dropped)
        self._apply_recipe(recipe_hparams)
        if converted:
            self._load_frozen(directory)
        if converted or branching:  # a universal checkpoint holds no buffers
            self._restore_buffers(ds_dir, allow_missing=branching)
        if self.expert_groups is not None:
            # DeepSpeed loaded every rank's module from the one model-states file, which holds expert rank 0's
            # experts; the fp32 master partitions hold each rank's own (deepspeed_experts).
            self.engine.optimizer.update_lp_params()

    def _load_converted(self, directory: Path, saved, current, fresh: list[str], scratch: Path | None,
                        dropped: frozenset[str] = frozenset()) -> None:
        values = self._gathered(fresh)  # collective at ZeRO-3
        if self.rank == 0:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)  # never reuse a conversion of another source
            else:
                console.print(f"resharding {directory.name}: written by {saved.describe()}, loading into "
                              f"{current.describe()} (DeepSpeed universal checkpoint)", soft_wrap=True)
        finish = None
        if fresh or dropped:
            def finish(universal: Path) -> None:
                add_fresh_entries(universal, values)
                drop_entries(universal, dropped)
        root = universal_on_every_rank(directory, DS_TAG, self.rank, dist.barrier, root=scratch, finish=finish)
        self._load_universal(root)
        dist.barrier()
        if self.rank == 0:  # derived files: the next checkpoint is written in this run's own layout
            shutil.rmtree(root, ignore_errors=True)

    def _load_converted_experts(self, directory: Path, saved, current, saved_ep: int, fresh: list[str],
                                scratch: Path | None, dropped: frozenset[str]) -> None:
        """`_load_converted` where expert parallelism is involved (written or loaded with it): DeepSpeed's own
        converter cannot join expert partitions, deepspeed_experts.write_universal does."""
        values = self._gathered(fresh)  # collective (expert tensors are gathered whole)
        counts = expert_parameter_counts(self.engine.module)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in _base_param_groups(self.engine.optimizer)]
        root = scratch if scratch is not None else directory / RESHARD_DIR
        if self.rank == 0:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            else:
                console.print(f"resharding {directory.name}: written by {saved.describe()} with "
                              f"expert_parallel_size={saved_ep}, loading into {current.describe()} with "
                              f"expert_parallel_size={self.cfg.expert_parallel_size} (DeepSpeed universal checkpoint)",
                              soft_wrap=True)

        def finish(universal: Path) -> None:
            add_fresh_entries(universal, values)
            drop_entries(universal, dropped)

        def convert(out: Path) -> None:
            experts.write_universal(directory / DS_TAG, out, counts, saved_ep, groups, finish)

        experts.universal_on_every_rank(root, UNIVERSAL_TAG, self.rank, dist.barrier, convert)
        self._load_universal(root)
        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(root, ignore_errors=True)

    def _saved_param_shapes(self, directory: Path) -> dict[str, tuple[int, ...]]:
        """The checkpoint's parameter shapes, expert tensors whole (as `_param_shapes`)."""
        shapes = saved_param_shapes(directory / DS_TAG)
        if experts.saved_expert_parallel_size(directory) == 1:
            return shapes
        return experts.global_shapes(shapes, expert_parameter_counts(self.engine.module))

    def _recipe_hparams(self) -> list[dict]:
        """This recipe's optimizer settings per group (the optimizer is built from it and not yet loaded)."""
        return [{k: v for k, v in g.items() if k not in ("params", "lr")}
                for g in _base_param_groups(self.engine.optimizer)]

    def _apply_recipe(self, recipe_hparams: list[dict]) -> None:
        """After a load: the recipe's weight decay, betas, eps, learning rates and clipping, where DeepSpeed
        restored the checkpoint's. Unchanged settings give the same values (an exact resume stays exact);
        changed ones take effect, as when a run stopped by non-finite losses resumes with a lower
        optim.lr or with optim.grad_clip set."""
        groups = _base_param_groups(self.engine.optimizer)  # a state-dict load replaces the group dicts
        for group, hparams in zip(groups, recipe_hparams):
            group.update(hparams)
        if self.engine.lr_scheduler is not None:
            self._rebase_schedule(groups, [h["initial_lr"] for h in recipe_hparams])
        if hasattr(self.engine.optimizer, "clip_grad"):  # ZeRO-1/2 and the bf16 optimizers load the saved one
            self.engine.optimizer.clip_grad = self.config["gradient_clipping"]

    def _param_shapes(self) -> dict[str, tuple[int, ...]]:
        # At ZeRO-3 a parameter's own shape is that of its partition; ds_shape is the full one. An expert
        # tensor counts all its layer's experts, whatever share this rank holds.
        module = self.engine.module
        shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters()}
        return experts.global_shapes(shapes, expert_parameter_counts(module))

    def _gathered(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Full fp32 copies on the CPU of the named parameters, or of the whole state dict (None), gathered
        from their partitions at ZeRO-3 and over the expert ranks with expert parallelism (a collective
        there: every rank calls it)."""
        module = self.engine.module
        params = dict(module.named_parameters())
        chosen = list(params.values()) if names is None else [params[n] for n in names]
        gather = contextlib.nullcontext()
        if self.cfg.zero_stage == 3 and chosen:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(chosen, modifier_rank=None)
        with gather:
            tensors = module.state_dict() if names is None else {n: params[n] for n in names}
            if self.expert_groups is not None:
                tensors = experts.gather_experts(tensors, set(expert_parameter_counts(module)), self.expert_groups)
            return {k: v.detach().float().cpu().clone() for k, v in tensors.items()}

    def _rebase_schedule(self, groups: list[dict], base_lrs: list[float]) -> None:
        """Learning rates from this recipe (`base_lrs`, one per group) at the schedule position the checkpoint
        reached: the loaded scheduler state carries the source's base rates."""
        sched = self.engine.lr_scheduler
        sched.base_lrs = list(base_lrs)
        lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, base, lr in zip(groups, base_lrs, lrs):
            group["initial_lr"], group["lr"] = base, lr
        sched._last_lr = lrs

    def _load_frozen(self, directory: Path) -> None:
        """A universal load fills the parameters the optimizer holds only: the frozen ones (e.g. a draft plugin's
        frozen base) are read from the checkpoint's own weights, which would otherwise keep the build's draw."""
        frozen = {n: p for n, p in self.engine.module.named_parameters() if not p.requires_grad}
        if not frozen:
            return
        import deepspeed

        from slimtrain.trainer.lifecycle.branch import source_weights

        weights = source_weights(directory)
        missing = sorted(set(frozen) - set(weights))
        if missing:
            raise RecipeError(f"{directory} lacks the frozen parameters {missing[:5]}; a frozen parameter must come "
                              "from the checkpoint (branch from a run whose model holds it)")
        stage3 = self.config["zero_optimization"]["stage"] == 3
        gathered = deepspeed.zero.GatheredParameters(list(frozen.values()), modifier_rank=0) if stage3 \
            else contextlib.nullcontext()
        with torch.no_grad(), gathered:
            for name, param in frozen.items():
                param.copy_(weights[name].to(param.device, param.dtype))

    def _load_universal(self, root: Path) -> None:
        # The engine reads this flag at load time only; it cannot be set at initialisation because a
        # normal resume of the same run must keep reading the sharded layout.
        self.engine._config.load_universal_checkpoint = True
        try:
            self._load_tag(root, UNIVERSAL_TAG)  # (a universal load takes the module from the zero/ entries)
        finally:
            self.engine._config.load_universal_checkpoint = False
        _repair_universal_optimizer_state(_base_param_groups(self.engine.optimizer), _base_state(self.engine.optimizer))

    def _restore_buffers(self, ds_dir: Path, allow_missing: bool = False) -> None:
        module = self.engine.module
        persistent = set(module.state_dict().keys()) - {n for n, _ in module.named_parameters()}
        saved = saved_buffers(ds_dir, persistent)
        missing = persistent - set(saved)
        if missing and not allow_missing:
            raise RuntimeError(f"{ds_dir} lacks the model buffers {sorted(missing)[:5]}; it was not written "
                               "by this model")
        with torch.no_grad():
            for name, buf in module.named_buffers():
                if name in saved:
                    buf.copy_(saved[name].to(buf.device, buf.dtype))

    def _load_tag(self, directory: Path, tag: str, strict: bool = True) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory), tag=tag, load_module_strict=strict, load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed state under {directory / tag}")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """All parameters and buffers, full size, fp32, on CPU, with the model's own names."""
        return self._gathered()


def _base_param_groups(optimizer) -> list[dict]:
    """The torch optimizer's param groups under DeepSpeed's wrapper (ZeRO and bf16 optimizers wrap it)."""
    return getattr(optimizer, "optimizer", optimizer).param_groups


def _base_state(optimizer) -> dict:
    """The torch optimizer's per-parameter state under DeepSpeed's wrapper."""
    return getattr(optimizer, "optimizer", optimizer).state


def _repair_universal_optimizer_state(groups: list[dict], state: dict) -> None:
    """Undo what DeepSpeed's universal load gets wrong for a torch AdamW with several groups (besides the
    hyperparameters, which `_apply_recipe` sets: at ZeRO-3 every group gets the first group's).

    At ZeRO-3 it gives all groups one shared `step` tensor, which Adam then advances once per group. The
    steps also come back on the CPU, where fused or capturable Adam (GPU) refuses them.
    """
    # Keyed by the state, not the groups: ZeRO-3 empties the groups' `params` between its steps.
    on_device = any(g.get("fused") or g.get("capturable") for g in groups)
    for p, st in state.items():
        if torch.is_tensor(st.get("step")):
            device = p.device if on_device else torch.device("cpu")
            st["step"] = st["step"].to(device=device, dtype=torch.float32, copy=True)
