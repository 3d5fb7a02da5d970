"""Recipe reproduction: the `expect:` block, `slimtrain reproduce` and `slimtrain compare` (docs/reproduce.md)."""
