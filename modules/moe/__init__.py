"""Mixture-of-experts: the `moe` plugin, its routers, balancing, grouped expert compute, expert parallelism,
upcycling and Hugging Face layouts (docs/moe.md)."""
