"""moe_load.png: each MoE layer's expert loads over training, a heat map per layer, from the vector metrics
`moe/load/layer<i>` (each expert's share of the layer's routed slots at each logged step)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_KEY = re.compile(r"^moe/load/layer(\d+)$")


def load_history(records: list[dict[str, Any]]) -> dict[int, tuple[list[int], list[list[float]]]]:
    """layer -> (steps, shares per step) from the training records."""
    history: dict[int, tuple[list[int], list[list[float]]]] = {}
    for record in records:
        for key, value in record.items():
            match = _KEY.match(key)
            if match and isinstance(value, list):
                steps, shares = history.setdefault(int(match.group(1)), ([], []))
                steps.append(record["step"])
                shares.append(value)
    return history


def plot_expert_load(records: list[dict[str, Any]], out: Path) -> Path | None:
    """Write the heat map (rows: experts, columns: logged steps, colour: share / uniform share)."""
    history = load_history(records)
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = sorted(history)
    fig, axes = plt.subplots(len(layers), 1, figsize=(8, 1.2 + 1.1 * len(layers)), dpi=110, squeeze=False,
                             sharex=True)
    for ax, layer in zip(axes[:, 0], layers):
        steps, shares = history[layer]
        grid = np.asarray(shares).T * len(shares[0])  # 1.0 = a perfectly even share
        image = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=max(2.0, float(grid.max())),
                          extent=(steps[0], steps[-1], grid.shape[0] - 0.5, -0.5), interpolation="nearest")
        ax.set_ylabel(f"layer {layer}\nexpert")
    axes[-1, 0].set_xlabel("step")
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="load / even load")
    fig.suptitle("expert load per MoE layer")
    fig.savefig(out)
    plt.close(fig)
    return out
