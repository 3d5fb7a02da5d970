"""slimtrain.core: the lowest layer, what every other package shares.

It imports no other slimtrain package. `slimtrain.data` and `slimtrain.modules` build on it (and not on
each other); `slimtrain.trainer` builds on all three. tests/test_layering.py enforces the order.

  registry.py   named registries and the did-you-mean hint of every unknown-name error
  sentinels.py  the values that mark padding and no-label positions
  masks.py      attention structure derived from `doc_ids` (document masks, `cu_seqlens`)
  documents.py  a batch's document layout, with the answers the host found before the batch moved
  locks.py      exclusive flock(2) locks on files (the data cache's source directories, a run directory)
"""
