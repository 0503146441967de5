"""The entry point's thread setting for ``shard``, made before torch is imported."""

from __future__ import annotations

import os
import subprocess
import sys

from uge_protect.cli.entry import set_thread_wait_policy


def test_shard_gets_passive_openmp_waits_unless_the_user_chose():
    env: dict[str, str] = {}
    set_thread_wait_policy(["shard", "in.tar", "-o", "out"], env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for mine in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"}, {"KMP_BLOCKTIME": "200"}):
        env = dict(mine)
        set_thread_wait_policy(["shard", "in.tar"], env)
        assert env == mine
    for argv in (["fit", "uge", "x"], ["eval", "--arch", "shard"], [], ["inspect", "shard"]):
        env = {}
        set_thread_wait_policy(argv, env)
        assert env == {}


def test_the_entry_point_imports_no_torch_before_the_setting_and_passes_it_to_the_run():
    probe = (
        "import os, sys\n"
        "import uge_protect.cli.entry as entry\n"
        "assert 'torch' not in sys.modules, 'the entry point imported torch'\n"
        "sys.argv = ['uge-protect', 'shard', '--help']\n"
        "import uge_protect.cli.app as app\n"
        "app.main = lambda: print(os.environ.get('OMP_WAIT_POLICY'))\n"
        "entry.main()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
