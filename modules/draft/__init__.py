"""Speculative-decoding draft heads: the `draft` plugin (MTP, Medusa, Hydra), the KV-cache speculative decoder
that measures acceptance, and their exports (docs/draft.md; issue 23, in progress)."""
