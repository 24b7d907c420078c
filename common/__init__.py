"""What every layer shares and nothing else: the error types (no imports of the other packages)."""
