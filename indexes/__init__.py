"""The search side: packed binary codes and the Hamming index (NumPy only, no torch)."""
