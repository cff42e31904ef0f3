"""Memory management of the paged KV cache (paper section 4.2-4.5): pure Python + NumPy.

Nothing here touches a tensor: every operation returns plain data (block ids, lists of
`(src, dst)` pairs) that the cache engine later applies to the KV tensors. That is what
lets the whole memory manager be specified by property tests without a model.
"""
