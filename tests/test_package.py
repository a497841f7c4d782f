"""Package conventions: light import, CLI, public signatures."""

from __future__ import annotations

import inspect
import subprocess
import sys

import virtualcell as vc


def test_import_is_light():
    code = "import sys, virtualcell; print(sorted(m for m in ('torch','transformers','pertpy','jax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_help_and_demo():
    out = subprocess.run([sys.executable, "-m", "virtualcell.cli", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout


def test_cli_error_is_clean(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "virtualcell.cli", "encode", "--data", str(tmp_path / "nope.h5ad"), "--out", str(tmp_path / "x.npz")],
        capture_output=True, text=True,
    )
    assert r.returncode == 2
    assert "No such file" in r.stderr and "Traceback" not in r.stderr


def test_public_functions_take_data_first_and_options_keyword_only():
    """scanpy-style signatures: data positional, everything else keyword-only."""
    for fn in (vc.sentences.encode, vc.sentences.decode):
        params = list(inspect.signature(fn).parameters.values())
        positional = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert len(positional) <= 2, fn.__name__
        assert all(p.kind is p.KEYWORD_ONLY for p in params[len(positional):]), fn.__name__
