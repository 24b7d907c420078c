"""The learning side: datasets, features, the AUCMH model, its training and the baselines."""
