"""The AUCMH network: the model, its checkpoints and the NumPy text path serving uses."""
