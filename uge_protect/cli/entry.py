"""The command line's entry point: settings that must be made before torch is imported.

``shard`` runs the method's pass in the main process while reader processes decode and
encoder threads compress on the same cores. OpenMP's threads, by default, spin while they
wait for work, and on a busy machine that spinning takes the cores the readers and encoders
need (measured on 2 cores: ``shard -m random`` a quarter slower, ``-m t2ue`` a fifth
slower; docs/performance.md). So ``shard`` makes them sleep instead (``OMP_WAIT_POLICY=PASSIVE``),
unless the user set a wait policy. The setting is read once, when OpenMP loads with torch,
which is why it is made here, before anything imports torch. Other commands (``fit``,
``eval``) keep OpenMP's default: they run torch alone, where spinning helps.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping, Sequence

#: Commands whose torch work shares the cores with other processes and threads.
PASSIVE_WAIT_COMMANDS = frozenset({"shard"})
#: Environment variables by which a user has already chosen how OpenMP threads wait.
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def set_thread_wait_policy(argv: Sequence[str], environ: MutableMapping[str, str]) -> None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in ``environ`` when the command of ``argv`` (without
    the program name) is in :data:`PASSIVE_WAIT_COMMANDS` and no wait setting is given."""
    if argv and argv[0] in PASSIVE_WAIT_COMMANDS and not any(k in environ for k in WAIT_SETTINGS):
        environ["OMP_WAIT_POLICY"] = "PASSIVE"


def main() -> None:
    """Console-script entry point (also ``python -m uge_protect``)."""
    set_thread_wait_policy(sys.argv[1:], os.environ)
    from uge_protect.cli.app import main as app_main

    app_main()
