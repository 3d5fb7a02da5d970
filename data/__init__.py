"""slimtrain.data: sources, tokenizer, token shards, packing and the resumable loader."""
