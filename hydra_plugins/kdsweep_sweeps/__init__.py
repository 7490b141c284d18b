"""Expose the checkout's ``sweeps/`` folder to kdsweep as the config group ``sweep``."""
