"""Mixture-of-experts: the `moe` plugin, its routers and grouped expert compute (docs/moe.md; issue 22, in
progress: no export, expert parallelism or capacity yet)."""
