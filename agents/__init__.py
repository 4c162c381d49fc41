"""Agents: ppo (workhorse), and agents built on it."""
