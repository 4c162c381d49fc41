"""Slurm launch helpers."""
