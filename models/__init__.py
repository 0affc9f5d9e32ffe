"""The DiT network, its TrigFlow consistency parametrization, the sampler and checkpoints."""
