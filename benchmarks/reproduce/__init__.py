"""Reproduction experiments: real data sets, reference models and trained baselines."""
