"""Checkpoints: PyTorch <-> JAX conversion and Orbax save/restore.

Conversion (command line `tpo-convert` = `tpo_jax.cli.convert`, see docs/conversion.md):
  convert.py            convert_videochat, convert_hf, read_report, model_config
  export.py             export_hf (merged or + PEFT adapter), export_videochat, ParamSet
  staging.py            staged_output: write to a temporary directory, move into place at the end
  orbax_io.py           streaming Orbax writer, load_params (either stack layout), load_extras, ArrayReader
  stacking.py           scanned stacks <-> the tables' per-layer paths (layouts, slice names, cross-layout loads)
  tables/               the declarative key tables, one module per component
  mapping.py, ops.py    the rule engine and the tensor transforms
  sources.py            safetensors / torch.load(weights_only=True) readers
  safetensors_writer.py streaming safetensors writer
  configs.py            config <-> JSON, Hugging Face / PEFT configs
  errors.py             ConversionError
Training checkpoints: manager.py.

The conversion API is importable from here lazily (`from tpo_jax.checkpoints import load_params`).
"""

_LAZY = {
    "convert_videochat": "tpo_jax.checkpoints.convert", "convert_hf": "tpo_jax.checkpoints.convert",
    "read_report": "tpo_jax.checkpoints.convert", "model_config": "tpo_jax.checkpoints.convert",
    "export_hf": "tpo_jax.checkpoints.export", "export_videochat": "tpo_jax.checkpoints.export", "ParamSet": "tpo_jax.checkpoints.export",
    "load_params": "tpo_jax.checkpoints.orbax_io", "load_extras": "tpo_jax.checkpoints.orbax_io",
    "ConversionError": "tpo_jax.checkpoints.errors",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tpo_jax.checkpoints' has no attribute {name!r}")
