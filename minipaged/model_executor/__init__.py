"""Everything that turns scheduled sequences into tensors: weights, KV cache, the runner."""
