"""Test-session setup shared by every test module."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from jaxrl_pref.runner import use_sync_cpu_dispatch  # noqa: E402

# as the experiment entry points do, before any test creates the CPU backend (jax#25861: host callbacks with
# asynchronous CPU dispatch can hang a vmapped program for good)
use_sync_cpu_dispatch()
