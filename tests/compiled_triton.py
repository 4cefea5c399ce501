"""Run a script that compiles Triton kernels for sm_90 without a GPU, as compiled (not interpreted) Triton.

Compiled Triton has stricter rules than the interpreter (globals, types across branches) and its output can
be inspected (registers, spills, PTX). The script runs in a fresh process without TRITON_INTERPRET, from the
repository root, and exits 77 when this Triton cannot compile for sm_90 here (no ptxas, an API difference):
the calling test is then skipped.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CANNOT_COMPILE_HERE = 77


def run_compile_script(script: str) -> str:
    """Run ``script`` (Python source) as described above; its stdout. Fails the test on any other error."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600, check=False)
    if done.returncode == CANNOT_COMPILE_HERE:
        pytest.skip(done.stdout.strip() or "this Triton cannot compile for sm_90 here")
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout
