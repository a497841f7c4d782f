"""Probe: common random numbers between the control and the perturbations (coupled sampling) on protocol 4.

    PYTHONPATH=. python experiments/results/attempts/coupled_sampling/probe_coupled.py MODE SEED OUT

MODE: independent | coupled | coupled_k1 (control samples = samples)
"""
import sys
from pathlib import Path

mode, seed, out = sys.argv[1], sys.argv[2], sys.argv[3]
import virtualcell.generation as G
import virtualcell.simulator as S

_orig = G.stable_key
if mode.startswith("coupled"):
    def coupled_key(text: str) -> int:
        if text == "control" or text.startswith("control#"):
            return _orig(text)
        name, _, j = text.partition("#")
        return _orig("control" if not j or j == "0" else f"control#{j}")
    G.stable_key = coupled_key
if mode == "coupled_k1":
    S.CONTROL_SAMPLES = 1
sys.path.insert(0, str(Path(S.__file__).resolve().parents[1] / "experiments"))
import protocol_4_screen_ranking as p4

p4.main(["--seed", seed, "--threads", "1", "--out", out])
