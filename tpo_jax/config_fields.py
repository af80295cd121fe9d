"""Field validation shared by every config dataclass (`tpo_jax.config` and the component configs it holds,
e.g. `tpo_jax.sam2.config`): one `ConfigError` naming the offending field as a dotted path from the root."""

from __future__ import annotations

from typing import Any

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config field holds a value the model cannot use."""


def check_field(ok: bool, path: str, message: str) -> None:
    """Raise one ConfigError naming the field at dotted `path` unless `ok`."""
    if not ok:
        raise ConfigError(f"config field '{path}': {message}")


def check_positive(cfg: Any, prefix: str, *names: str) -> None:
    """Each named field of `cfg` must be a positive integer."""
    for name in names:
        value = getattr(cfg, name)
        check_field(isinstance(value, int) and value > 0, f"{prefix}{name}", f"must be a positive integer, got {value!r}")
