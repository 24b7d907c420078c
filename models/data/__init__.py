"""Datasets: every source (Wikipedia, Web News, your own pairs, the demo) as one PairDataset."""
