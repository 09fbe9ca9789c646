"""GPU test backend and the GPU run's driver for llmuxd (see tests/gpu/backend.py, tests/gpu/run.sh).

Imported as the package ``gpu``, with tests/ on the Python path (as pytest and tests/gpu/run.sh have it)."""
