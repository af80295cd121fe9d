"""Checkpoints: PyTorch <-> JAX conversion and Orbax save/restore.

Conversion (`tpo-convert`, see docs/conversion.md):
  convert.py            convert_videochat, convert_hf, main (the command line)
  export.py             export_hf (merged or + PEFT adapter), export_videochat, ParamSet
  orbax_io.py           streaming Orbax writer, load_params, load_extras
  tables/               the declarative key tables, one module per component
  mapping.py, ops.py    the rule engine and the tensor transforms
  sources.py            safetensors / torch.load(weights_only=True) readers
  safetensors_writer.py streaming safetensors writer
  configs.py            config <-> JSON, Hugging Face / PEFT configs
  errors.py             ConversionError
Training checkpoints: manager.py.

The conversion API is importable from here lazily (`from checkpoints import load_params`).
"""

_LAZY = {
    "convert_videochat": "checkpoints.convert", "convert_hf": "checkpoints.convert",
    "read_report": "checkpoints.convert", "model_config": "checkpoints.convert",
    "export_hf": "checkpoints.export", "export_videochat": "checkpoints.export", "ParamSet": "checkpoints.export",
    "load_params": "checkpoints.orbax_io", "load_extras": "checkpoints.orbax_io",
    "ConversionError": "checkpoints.errors",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'checkpoints' has no attribute {name!r}")
