"""The command-line tools behind ``python -m ftattn`` (ftattn/__main__.py): the fault
campaign (also a library: ``run``, ``Shape``, the clean data sets), ``info``, the
benchmark report, the MX accuracy harness (``mx-eval``) and peak-memory measurement.
Each command module defines ``add_arguments(parser)`` and ``main(args) -> int``."""
