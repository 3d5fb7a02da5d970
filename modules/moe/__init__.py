"""Mixture-of-experts (issue 22, in progress): routers and grouped expert compute. The `moe` plugin that
swaps them into a recipe's model is not registered yet; see docs/moe.md."""
