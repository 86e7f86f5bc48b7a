"""Calibration: statistics file, forward hooks, inputs, distributed reduction and the run itself."""
