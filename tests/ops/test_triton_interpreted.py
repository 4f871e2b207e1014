"""Runs ``tests/triton_interpreted`` in a process of its own under Triton's interpreter
(``TRITON_INTERPRET=1`` must be set before triton is first imported, which this process has
done already), with the Triton kernels forced, and fails unless all of it passed."""

from __future__ import annotations

import os
import re
import subprocess
import sys

FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "triton_interpreted")


def test_triton_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "DEFORMABLE_KERNELS": "triton"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", FOLDER],
        env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    tail = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    summary = result.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 0, tail
    assert not re.search(r"skipped|xfail|deselected", summary), tail
