"""Integrations with other engines: :mod:`omnicache.integrations.diffusers` (diffusers
transformers: static plans, dynamic policies, torch.compile, CUDA graphs, sequence
parallelism through :mod:`omnicache.integrations.distributed`)."""
