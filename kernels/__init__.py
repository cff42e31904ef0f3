"""The kernels of PagedAttention, installed as `minipaged.kernels`.

- `reference`: pure-NumPy executable definitions (read these first);
- `cache_ops`, `paged_attention`: Triton kernels with the same signatures.

Layout everywhere: key_cache / value_cache are [num_blocks, block_size, num_kv_heads,
head_dim]; the slot of token t of a sequence is block_table[t // B] * B + t % B.
"""
