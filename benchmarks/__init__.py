"""Throughput scripts (not tests)."""
