"""The paged KV cache: block allocator, the preallocated page pool, and page gather/scatter."""
