"""The command-line tools, one module per command (`tpo-train`, `tpo-eval`, `tpo-convert`, ...).

This is the top layer: it may import everything; nothing in the library imports it. Each module holds
the argument parsing and a `main(argv=None) -> int`; the work itself lives in the library.
"""
