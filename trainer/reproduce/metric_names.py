"""Which metric names a recipe's run writes, known before the run: the trainer's own (below) and the ones each
plugin declares (`Plugin.metric_names`, fnmatch patterns). `expect:` targets are checked against them when the
recipe is validated; a plugin that declares nothing defers the check to `slimtrain reproduce`, which names the
run's own metrics when one is missing."""

from __future__ import annotations

from fnmatch import fnmatchcase

from slimtrain.core.registry import did_you_mean

TRAINER_METRICS: dict[str, str] = {
    "step": "the optimizer step of the record",
    "loss": "training loss of the step (nats per label token)",
    "lr": "learning rate of the step",
    "grad_norm": "global gradient norm before clipping",
    "tokens": "tokens trained on so far",
    "tokens_per_s": "training throughput over the last steps",
    "skipped": "whether the step was skipped (non-finite loss or gradient)",
    "skipped_steps": "steps skipped so far",
    "time_s": "seconds of training so far (evaluations included)",
    "mfu": "model FLOPs utilisation (GPUs of known peak only)",
    "row_len": "row length of the step (data.packer=buckets)",
    "eval_loss": "held-out loss (nats per label token)",
    "eval_ppl": "exp(eval_loss)",
    "eval_tokens": "held-out tokens of the evaluation",
    "eval_s": "seconds the evaluation took",
}
"""What the training loop (trainer/lifecycle/loop.py) writes to metrics.jsonl; a test holds it to a real run."""

DERIVED_METRICS: dict[str, str] = {
    "flops": "training FLOPs so far: tokens x the model's training FLOPs per token (plugins included) at each "
             "record's row length",
}
"""Figures `slimtrain reproduce` computes from the records (run_data.py)."""


def known_patterns(plugins) -> tuple[list[str], list[str]]:
    """(name patterns the run will write, names of the plugins that declare none) for a recipe's `plugins:`."""
    from slimtrain.modules.plugin_stack import PluginStack

    patterns = [*TRAINER_METRICS, *DERIVED_METRICS]
    undeclared = []
    for plugin in PluginStack.from_configs(plugins):
        names = plugin.metric_names()
        if names is None:
            undeclared.append(plugin.name)
        else:
            patterns += plugin_patterns(plugin.name, names)
    return patterns, undeclared


def plugin_patterns(name: str, declared) -> list[str]:
    """A plugin's declared `MetricNames` as metrics.jsonl holds them (the prefixes PluginStack gives its hooks'
    keys, and the loop's `eval/` before an evaluation's)."""
    return [*(f"{name}/{t}" for t in declared.losses), *(f"eval/{name}/{t}" for t in declared.losses),
            *declared.metrics, *(f"eval/{name}/{k}" for k in declared.evaluate)]


def is_known(name: str, patterns: list[str]) -> bool:
    """Whether `name` matches one of `patterns` (`*` stands for any text)."""
    return any(fnmatchcase(name, p) for p in patterns)


def check_expect_metrics(expect, plugins) -> None:
    """ValueError naming the field of every `expect:` metric that the trainer and the recipe's plugins do not write
    (unless a plugin declares nothing: then the run's metrics.jsonl decides, at check time)."""
    patterns, undeclared = known_patterns(plugins)
    if undeclared:
        return
    bad = [(field, name) for field, name in expect.metric_fields() if not is_known(name, patterns)]
    if not bad:
        return
    lines = []
    for field, name in bad:
        hint = did_you_mean(name, patterns)
        lines.append(f"{field}={name!r} is not a metric this recipe's run writes" + (f" ({hint})" if hint else ""))
    raise ValueError("; ".join(lines) + f". Its metrics: {', '.join(patterns)}. A benchmark's figure needs "
                     "`file:` (its JSON output) with a key path as the metric")
