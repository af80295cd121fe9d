"""tpo-jax: Task Preference Optimization (TPO) multimodal LLMs in JAX/Flax NNX."""

from tpo_jax.config import ConfigError, TPOConfig, get_config

__all__ = ["ConfigError", "TPOConfig", "get_config"]
