"""jaxrl_pref: shared pieces of the agents (networks, rollout, losses, reward models, logging, checkpoints)."""
__version__ = "0.1.0"
