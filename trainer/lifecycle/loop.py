"""The training loop: backend-agnostic, plugin-agnostic. One instance per rank."""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimtrain.trainer.lifecycle import signals
from slimtrain.trainer.backends import Backend, StepResult
from slimtrain.data.errors import LoaderStateError
from slimtrain.trainer.lifecycle.branch import (
    check_branch, check_fresh_start, check_resume, check_same_tokenizer, pinned_source, resume_mode, source_state,
)
from slimtrain.trainer.lifecycle.checkpoint import (
    find_resume_point, load_checkpoint, load_rng, move_aside, save_checkpoint, step_of,
)
from slimtrain.trainer.recipe.schema import Recipe
from slimtrain.trainer.errors import CheckpointError, TrainingStopped
from slimtrain.trainer.testing.faults import fault_active, maybe_fault
from slimtrain.trainer.logging import (
    WANDB_ID_FILE, MetricsLog, ProgressBar, Throughput, Wandb, console, plot_losses,
)
from slimtrain.modules.plugin import PluginContext
from slimtrain.trainer.loss.lm import make_loss_fn
from slimtrain.trainer.recipe.loading import dump_recipe
from slimtrain.trainer.lifecycle.run import RunParts
from slimtrain.trainer.reproduce.report import CURVE_FILE, REPORT_FILE


# What an earlier run leaves in its run directory; checkpoint.resume=never moves these into previous_N/.
EARLIER_RUN_FILES = ("checkpoints", "metrics.jsonl", "loss_curve.png", "wandb", WANDB_ID_FILE, REPORT_FILE, CURVE_FILE)


@dataclass
class LoopState:
    """What the loop carries between steps and into `trainer_state.json`."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    elapsed_s: float = 0.0
    last_eval: dict[str, float] = field(default_factory=dict)
    finished: bool = False
    """True once the final evaluation and checkpoint are done: a rerun of a finished run does nothing."""

    def to_dict(self) -> dict[str, Any]:
        """The fields `trainer_state.json` holds."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps,
                "nonfinite_in_a_row": self.nonfinite_in_a_row, "elapsed_s": self.elapsed_s,
                "last_eval": self.last_eval, "finished": self.finished}

    @classmethod
    def from_dict(cls, state: dict[str, Any], keep_time: bool = True) -> "LoopState":
        """The state a checkpoint's `trainer_state.json` holds. keep_time=False (a branch): the clock, the
        streak of non-finite steps and `finished` start afresh, since they belong to the source run."""
        restored = cls(step=state["step"], tokens_seen=state["tokens_seen"], skipped_steps=state["skipped_steps"],
                       last_eval=state.get("last_eval", {}))
        if keep_time:
            restored.nonfinite_in_a_row = state["nonfinite_in_a_row"]
            restored.elapsed_s = state["elapsed_s"]
            restored.finished = state.get("finished", False)
        return restored


class Trainer:
    """Runs `recipe` with the already built parts (model, backend, loaders) of this rank."""

    def __init__(self, recipe: Recipe, parts: RunParts) -> None:
        self.recipe = recipe
        self.parts = parts
        self.backend: Backend = parts.backend
        self.is_main = self.backend.rank == 0
        self.run_dir = Path(recipe.run.resolved_output_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.metrics = MetricsLog(self.run_dir, enabled=self.is_main)
        self.state = LoopState()
        self.recipe_yaml = dump_recipe(recipe)
        self.plugins = parts.plugins
        self.ctx = self.plugins.bind(PluginContext(model=self.backend.module, device=self.backend.device,
                                                   comm=self.backend.comm, groups=self.backend.process_groups))
        # One loss for training and evaluation: the plugins' terms are measured on held-out data too.
        self.loss_fn = make_loss_fn(self.plugins, self.ctx, recipe.train.loss_chunk_tokens, recipe.train.compile,
                                    cross_entropy=self.backend.cross_entropy)
        self.val_loader = None  # built at the first evaluation, restarted by every later one
        self._flops_at: dict[int, float] = {}  # training FLOPs per token by row length
        self.started = signals.PROCESS_START  # train.stop_after_minutes counts this process's time only

    def run(self) -> LoopState:
        """Train to `train.steps` (or until stopped by a signal or the time limit); returns the final state."""
        signals.install()
        self._maybe_resume()
        cfg = self.recipe.train
        wandb = Wandb(self.recipe, self.run_dir, enabled=self.is_main)
        bar = ProgressBar(cfg.steps, self.state.step, enabled=self.is_main and self.recipe.logging.progress)
        tput = Throughput(self._flops_per_token(self.recipe.data.seq_len))
        started = time.monotonic() - self.state.elapsed_s
        batches = iter(self.parts.train_loader)
        stop_reason = ""
        try:
            while self.state.step < cfg.steps:
                micro = [next(batches) for _ in range(self.parts.grad_accum)]
                self.ctx.step = self.state.step + 1
                self.plugins.on_step_start(self.ctx)
                result = self.backend.train_step(micro, self._loss_fn(self.ctx.step))
                self.plugins.after_optimizer_step(self.ctx)
                self.state.elapsed_s = time.monotonic() - started
                self._account(result)
                row_len = micro[0].input_ids.shape[-1]  # rows may change length between steps (data.packer=buckets)
                tput.add(result.tokens, self._flops_per_token(row_len))
                self._log_step(result, tput, bar, wandb, row_len)
                stop_reason = self._stop_reason()
                # A stop saves at once (an evaluation first could outlast the scheduler's grace period);
                # the last step's evaluation and save are _finish's.
                if not stop_reason and self._eval_due():
                    self._evaluate(wandb)
                    stop_reason = self._stop_reason()  # a signal that came during the evaluation
                if stop_reason or self._save_due():
                    self._save()
                    maybe_fault("hang_after_save", self.state.step, self.backend.rank)
                    stop_reason = stop_reason or self._stop_reason()  # a signal that came during the save
                if stop_reason:
                    break
            if not stop_reason:
                self._finish(wandb)
        finally:
            bar.close()
            wandb.close()
        if stop_reason:
            self._after_stop(stop_reason)
        return self.state

    # -- steps -----------------------------------------------------------------------------------

    def _loss_fn(self, step: int):
        if not fault_active("nan_loss", step):
            return self.loss_fn

        def poisoned(model, batch, norm):  # test hook: a step whose loss is NaN on every rank
            loss, total, terms = self.loss_fn(model, batch, norm)
            return loss * float("nan"), total * float("nan"), terms

        return poisoned

    def _account(self, result: StepResult) -> None:
        self.state.step += 1
        self.state.tokens_seen += result.tokens
        self.state.finished = False  # a run continued past its end (train.steps raised) finishes again
        finite = math.isfinite(result.loss)
        if finite and result.applied:
            self.state.nonfinite_in_a_row = 0
            return
        self.state.skipped_steps += 1
        self.state.nonfinite_in_a_row += 1
        limit = self.recipe.train.max_nonfinite_steps
        if self.state.nonfinite_in_a_row >= limit:
            raise TrainingStopped(
                f"{limit} steps in a row had a non-finite loss or gradient (last at step {self.state.step}); "
                f"stopped. Resume from {self.ckpt_root} with a lower optim.lr, a longer "
                "optim.schedule.warmup_steps or optim.grad_clip set, or raise train.max_nonfinite_steps."
            )

    def _flops_per_token(self, row_len: int) -> float:
        """Training FLOPs per token of rows of `row_len` tokens (the attention's share grows with it)."""
        if row_len not in self._flops_at:
            self._flops_at[row_len] = self.plugins.counts(self.parts.model_cfg, row_len).flops_per_token
        return self._flops_at[row_len]

    def _log_step(self, result: StepResult, tput: Throughput, bar: ProgressBar, wandb: Wandb, row_len: int) -> None:
        mfu = tput.mfu(self.backend.world_size)
        tps = tput.tokens_per_s()
        shown = f"loss {result.loss:.4f}  lr {result.lr:.2e}  {tps:,.0f} tok/s" + (f"  MFU {mfu:.1%}" if mfu else "")
        bar.update(self.state.step, shown)
        if self.state.step % self.recipe.train.log_every and self.state.step != self.recipe.train.steps:
            return
        record: dict[str, Any] = {
            "step": self.state.step, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
            "tokens": self.state.tokens_seen, "tokens_per_s": tps, "skipped": not result.applied,
            "skipped_steps": self.state.skipped_steps, "time_s": round(self.state.elapsed_s, 3), **result.extras,
        }
        if mfu is not None:
            record["mfu"] = mfu
        if getattr(self.parts.train_loader, "row_lengths_vary", False):
            record["row_len"] = row_len
        record.update(self._mean_over_ranks(self.plugins.metrics(self.ctx)))
        self.metrics.write(record)
        wandb.log(record)

    def _stop_reason(self) -> str:
        """Agreed over ranks: 'preempted' (SIGUSR1), 'terminated' (SIGTERM), 'time', or '' to go on."""
        sig = signals.pending()
        limit = self.recipe.train.stop_after_minutes
        over = limit is not None and time.monotonic() - self.started >= limit * 60
        usr1, term, late = self.backend.all_reduce_sum(
            [float(sig == signal.SIGUSR1), float(sig == signal.SIGTERM), float(over)]
        )
        return "preempted" if usr1 else "terminated" if term else "time" if late else ""

    def _eval_due(self) -> bool:
        every = self.recipe.eval.every
        return bool(every) and self.state.step % every == 0 and self.state.step != self.recipe.train.steps

    def _save_due(self) -> bool:
        return self.state.step % self.recipe.checkpoint.every == 0 and self.state.step != self.recipe.train.steps

    # -- eval, save, resume ------------------------------------------------------------------------

    def _mean_over_ranks(self, values: dict[str, float | list[float]]) -> dict[str, float | list[float]]:
        """`values` (the same keys and vector lengths on every rank) averaged over the ranks, in one collective."""
        if not values:
            return {}
        keys = sorted(values)
        flat = [[float(x) for x in v] if isinstance(v, (list, tuple)) else [float(v)] for v in (values[k] for k in keys)]
        summed = iter(self.backend.all_reduce_sum([x for v in flat for x in v]))
        means = {k: [next(summed) / self.backend.world_size for _ in v] for k, v in zip(keys, flat)}
        return {k: m if isinstance(values[k], (list, tuple)) else m[0] for k, m in means.items()}

    def _val_batches(self):
        """One pass of at most `eval.batches` held-out micro-batches (the val loader restarts on each pass)."""
        if self.val_loader is None:
            self.val_loader = self.parts.make_val_loader()
        try:
            for i, batch in enumerate(self.val_loader):
                if i >= self.recipe.eval.batches:
                    break
                yield batch
        finally:  # a pass cut short by eval.batches would leave its prefetch thread waiting forever
            close = getattr(self.val_loader, "close", None)
            if close is not None:
                close()

    def _evaluate(self, wandb: Wandb) -> dict[str, float]:
        """The held-out loss, every plugin's loss terms on the same batches, then the plugins' own evaluations."""
        loss_sum, tokens, batches, term_sums = 0.0, 0, 0, {}
        began = time.monotonic()
        self.ctx.training = False
        try:
            for batch in self._val_batches():
                s, n, terms = self.backend.eval_step(batch, self.loss_fn)
                loss_sum, tokens = loss_sum + s, tokens + n
                # A terms' mean over micro-batches that have labels: the padding that ends a val pass on some
                # ranks has none, and a term's mean over no token is NaN. Keys are seen on every micro-batch.
                batches += n > 0
                for name, value in terms.items():
                    term_sums[name] = term_sums.get(name, 0.0) + (value if n > 0 else 0.0)
            names = sorted(term_sums)
            loss_sum, tokens, batches, *summed = self.backend.all_reduce_sum(
                [loss_sum, float(tokens), float(batches), *(term_sums[k] for k in names)])
            loss = loss_sum / max(tokens, 1.0)
            results = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": tokens}
            results.update({f"eval/{k}": v / max(batches, 1.0) for k, v in zip(names, summed)})
            results.update({f"eval/{k}": v for k, v in self.plugins.evaluate(self.ctx, self._device_batches).items()})
        finally:
            self.ctx.training = True
        self.state.last_eval = results
        # eval_s: the steps' time_s counts evaluations too; this lets a reader take them out (benchmarks/buckets.py)
        record = {"step": self.state.step, **results, "eval_s": round(time.monotonic() - began, 3)}
        self.metrics.write(record)
        wandb.log(record)
        if self.is_main:
            extra = "".join(f"  {k.removeprefix('eval/')} {v:.4g}" for k, v in results.items() if k.startswith("eval/"))
            console.print(f"[cyan]eval[/] step {self.state.step}: loss {loss:.4f}  ppl {results['eval_ppl']:.2f}{extra}",
                          soft_wrap=True)
        return results

    def _device_batches(self):
        """Held-out batches on the model's device, with the model in eval mode (for `Plugin.evaluate`)."""
        self.ctx.model.eval()
        for batch in self._val_batches():
            yield batch.to(self.backend.device)

    def _save(self) -> Path:
        state = {
            **self.state.to_dict(), "world_size": self.backend.world_size,
            "loader": self.parts.train_loader.state_dict(),
            "model_config": self.parts.model_cfg.model_dump(mode="json"), "tokenizer": self.parts.tokenizer_ids,
        }
        return save_checkpoint(self.ckpt_root, self.state.step, self.backend, state, self.recipe_yaml,
                               self.recipe.checkpoint.keep, copy_dirs={"tokenizer": self.parts.tokenizer_dir})

    def _continue_from(self, state: LoopState) -> None:
        """Take over a checkpoint's loop state (a resume or a branch), after the backend loaded its weights."""
        self.state = state
        self.metrics.truncate_after(state.step)
        self.ctx.step = state.step  # re-derive step-dependent plugin state (evaluation may follow without a step)
        self.plugins.on_step_start(self.ctx)

    def _maybe_resume(self) -> None:
        if resume_mode(self.recipe) == "never":
            check_fresh_start(self.recipe)  # on every rank, before rank 0 moves anything
            self._move_earlier_run_aside()
            path = None
        else:
            path = self._agreed_resume_point()
        if path is None:
            self.metrics.truncate_after(0)  # lines of a start that crashed before its first checkpoint
            if self.recipe.checkpoint.branch_from:
                self._branch(pinned_source(self.recipe, self.ckpt_root, self.is_main, self.backend.barrier))
            return
        check_resume(self.recipe, path)
        state = source_state(path)
        self.parts.train_loader.load_state_dict(state["loader"])  # a changed data stream fails before the load
        load_checkpoint(path, self.backend)
        self._continue_from(LoopState.from_dict(state))
        if self.is_main:
            console.print(f"[green]resumed[/] from {path} at step {self.state.step}")

    def _move_earlier_run_aside(self) -> None:
        """checkpoint.resume=never: a fresh start next to an earlier run's files would mix the two."""
        if self.is_main:
            moved = move_aside(self.run_dir, EARLIER_RUN_FILES)
            if moved is not None:
                console.print(f"checkpoint.resume=never: the earlier run's files are now in {moved}")
        self.backend.barrier()

    def _agreed_resume_point(self) -> Path | None:
        """The checkpoint every rank resumes from; they must all see the same one (a shared run.output_dir)."""
        try:
            path, error = find_resume_point(self.ckpt_root), None
        except CheckpointError as exc:
            path, error = None, exc
        mine = -2 if error else -1 if path is None else step_of(path)
        (total,) = self.backend.all_reduce_sum([float(mine)])
        (disagree,) = self.backend.all_reduce_sum([float(mine * self.backend.world_size != total)])
        if disagree:
            raise CheckpointError(
                f"the ranks see different checkpoints in {self.ckpt_root} (rank {self.backend.rank}: "
                f"{path.name if path else 'none'}); run.output_dir must be one directory that every node "
                "shares (a cluster filesystem), not a node-local disk"
            )
        if error is not None:
            raise error
        return path

    def _branch(self, source: Path) -> None:
        """Continue `source` (another run's checkpoint) under this recipe; see slimtrain.trainer.lifecycle.branch."""
        check_branch(self.recipe, source)
        check_same_tokenizer(source, self.parts.prepared.tokenizer.hash)
        state = source_state(source)
        fresh = self.backend.branch(source, self.ckpt_root / ".branch")
        load_rng(source, self.backend.rank)
        try:
            self.parts.train_loader.load_state_dict(state["loader"])
            data = "the data position carries over"
        except LoaderStateError as exc:
            data = f"the data stream starts from its beginning ({str(exc).split(';')[0]})"
        # elapsed_s restarts: train.stop_after_minutes limits this run, not the source's time.
        self._continue_from(LoopState.from_dict(state, keep_time=False))
        if self.is_main:
            added = f"{len(fresh)} new parameter tensor(s) start fresh" if fresh else "no new parameters"
            console.print(f"[green]branched[/] from {source} at step {self.state.step}: {added}; {data}",
                          soft_wrap=True)

    def _finish(self, wandb: Wandb) -> None:
        if self.state.finished:
            if self.is_main:
                console.print(f"[green]finished[/] already at step {self.state.step}; nothing to train "
                              f"(raise train.steps above {self.state.step} to train on)")
        else:
            self._evaluate(wandb)
            self.state.finished = True
            self._save()
        if self.is_main and self.recipe.logging.plot:
            records = self.metrics.read()
            plot = plot_losses(records, self.run_dir / "loss_curve.png")
            if plot:
                console.print(f"loss curve: {plot}")
            for path in self.plugins.plots(records, self.run_dir):
                console.print(f"plot: {path}")

    def _after_stop(self, reason: str) -> None:
        if self.is_main:
            console.print(f"[yellow]stopped[/] at step {self.state.step} ({reason}); checkpoint saved, resumable")
        if reason == "preempted" and self.is_main:
            from slimtrain.trainer.lifecycle.preemption import requeue_job

            if requeue_job():
                console.print("requeued the SLURM job; it resumes from the checkpoint just written")
