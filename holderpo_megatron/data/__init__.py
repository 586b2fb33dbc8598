"""Datasets, prompt templates and batching by token budget (imports nothing of ours)."""
