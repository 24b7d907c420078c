"""Retrieval metrics, the evaluation protocol and reports."""
