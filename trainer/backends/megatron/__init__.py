"""The megatron-core backend (in progress): tensor parallelism of our Transformer through megatron-core's own
layers. See docs/backends.md, "megatron-core"."""
