"""Running an experiment's ``main(argv)`` in the test's process, as ``python -m <module> argv`` would run it: the
one harness of the in-process CLI tests (tests/test_cli.py, test_cli_documented.py, test_cli_errors.py).
Process-level behaviour (signals, exit statuses a shell sees, settings only a fresh process has) stays in
subprocess tests; docs/testing.md says which is which."""
from __future__ import annotations

import dataclasses
import importlib
import logging
import re


class _Compiles(logging.Handler):
    """The programs JAX compiles while installed (what ``JAX_LOG_COMPILES=1`` prints: "Compiling jit(NAME) ...")."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.names: set[str] = set()

    def emit(self, record):
        self.names.update(re.findall(r"^Compiling jit\((.*?)\) ", record.getMessage()))


@dataclasses.dataclass
class Ran:
    status: int
    out: str
    err: str
    programs: set
    """The names of the programs compiled while it ran (with ``programs=True``)."""
    events: list
    """JAX's ``/jax/core/compile/...`` monitoring events (tracing, lowering, compiling) while it ran."""


def main_here(monkeypatch, capsys, module: str, *args, programs: bool = False, fresh: bool = False) -> Ran:
    """``<module>.main(args)`` (``raise SystemExit(main())`` as ``python -m`` runs it; a ``SystemExit``, e.g. a bad
    option's exit 2, is the status) with plain progress lines (CI=true); JAX's default matmul precision, which a run
    sets from its options, is put back. ``programs``: JAX's compile log is recorded (it also goes to stderr);
    ``fresh``: JAX's in-memory caches are cleared first, so that it compiles what a new process would."""
    import jax
    from jax._src.interpreters import pxla
    exp = importlib.import_module(module)
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("JAXRL_DEBUG", "")  # records its value: restored after the test, though --debug sets it
    monkeypatch.delenv("JAXRL_DEBUG")
    if fresh:
        jax.clear_caches()
    compiles, events = _Compiles(), []

    def listen(event, duration, **kw):
        if event.startswith("/jax/core/compile/"):
            events.append(event)
    precision = jax.config.jax_default_matmul_precision
    capsys.readouterr()
    jax.monitoring.register_event_duration_secs_listener(listen)
    if programs:
        pxla.logger.addHandler(compiles)
    try:
        if programs:
            with jax.log_compiles(True):
                status = exp.main(list(args))
        else:
            status = exp.main(list(args))
    except SystemExit as e:
        status = e.code
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
        pxla.logger.removeHandler(compiles)
        jax.config.update("jax_default_matmul_precision", precision)
    out, err = capsys.readouterr()
    return Ran(status, out, err, compiles.names, events)
