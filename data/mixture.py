"""Which documents an epoch uses, in which order: every document once, or a weighted mixture of sources.

With weights, an epoch holds as many tokens as the split (so epochs keep their size) and source i
contributes weight_i of them: whole shuffled passes over the source while its share exceeds its size
(up-sampling), then a shuffled prefix (down-sampling). Each source's token count misses its target by
less than one document, so the realised proportions match the weights to within one document's
length per epoch; everything is deterministic from the generator.
"""

from __future__ import annotations

import numpy as np

from slimtrain.data.dataset import TokenDataset
from slimtrain.data.errors import DataError


def _draw(first: int, lengths: np.ndarray, budget: float, rng: np.random.Generator) -> np.ndarray:
    """Document indices of one source (starting at `first`) totalling about `budget` tokens."""
    total = int(lengths.sum())
    passes = int(budget // total)
    picks = [first + rng.permutation(len(lengths)) for _ in range(passes)]
    rest = budget - passes * total
    if rest > 0:
        order = rng.permutation(len(lengths))
        cum = np.cumsum(lengths[order])
        # The prefix whose total is closest to what is left: error below half a document on average.
        k = int(np.searchsorted(cum, rest))
        if k < len(cum) and (k == 0 or cum[k] - rest < rest - cum[k - 1]):
            k += 1
        picks.append(first + order[:k])
    return np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)


def epoch_documents(dataset: TokenDataset, weights: list[float] | None, rng: np.random.Generator) -> np.ndarray:
    """Document indices of one epoch in a seeded random order (a document may repeat under weights)."""
    if weights is None:
        return rng.permutation(len(dataset)).astype(np.int64)
    per_source = dataset.source_tokens()
    for i, tokens in enumerate(per_source.tolist()):
        if tokens == 0:
            raise DataError(
                f"data.sources[{i}] has weight {weights[i]} but no {dataset.split} documents; remove the source or "
                "check its files"
            )
    shares = np.asarray(weights, dtype=np.float64) / sum(weights)
    budget = shares * dataset.num_tokens
    bounds = dataset.source_bounds
    chosen = [
        _draw(int(bounds[i]), dataset.doc_len[bounds[i] : bounds[i + 1]], float(budget[i]), rng)
        for i in range(dataset.num_sources)
    ]
    docs = np.concatenate(chosen)
    return docs[rng.permutation(len(docs))]
