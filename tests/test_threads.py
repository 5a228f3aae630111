"""crv sets OpenMP's passive wait policy before torch loads OpenMP, and keeps a value the user set."""

import os
import subprocess
import sys


def _policy_seen(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_value is not None:
        env["OMP_WAIT_POLICY"] = env_value
    code = "import crv, os, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    return subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout.strip()


def test_import_sets_passive_wait_policy():
    assert _policy_seen(None) == "PASSIVE"


def test_a_value_the_user_set_is_kept():
    assert _policy_seen("ACTIVE") == "ACTIVE"
