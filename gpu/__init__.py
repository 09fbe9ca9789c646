"""GPU test backend and the device run driver for llmuxd (see gpu/backend.py, gpu/run.sh)."""
