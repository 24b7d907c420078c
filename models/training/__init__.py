"""Training AUCMH: the anchor-graph and ranking losses, and the loop with validation selection."""
