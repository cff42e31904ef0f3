"""Model architectures (LLaMA, OPT) written against the paged attention interface."""
