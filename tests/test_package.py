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


def test_cli_help_and_demo(tmp_path, capsys):
    """`virtualcell demo` screens every knockout the bundled model knows, prints the ranking, the picks and the
    comparison with the measured replicate, and writes its folder (fewer baseline cells than the default)."""
    import pandas as pd

    from virtualcell.cli import main

    out = subprocess.run([sys.executable, "-m", "virtualcell.cli", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout
    assert main(["demo", "--n-cells", "6", "--quiet", "--top", "25", "--out", str(tmp_path / "demo")]) == 0
    printed = capsys.readouterr().out
    ranking = pd.read_csv(tmp_path / "demo" / "ranking.csv")
    assert len(ranking) == 25 and ranking["perturbation"].str.startswith("ko:").all()
    assert list(ranking["rank"]) == list(range(1, 26)) and ranking["score"].is_monotonic_decreasing
    assert ranking["pick"].sum() == 8  # the demo asks for 8 diverse picks
    for name in ranking["perturbation"]:  # every candidate is printed, in rank order
        assert name in printed
    lines = printed.splitlines()
    rows = [line.split()[1] for line in lines if line.strip()[:1].isdigit() and "ko:" in line]
    assert rows == list(ranking["perturbation"])
    picks = lines[lines.index("Top genes of the diverse picks:") + 1:][:8]
    assert [line.split()[0] for line in picks] == list(ranking.loc[ranking["pick"], "perturbation"])
    assert "Spearman over 25 knockouts" in printed
    # the measured rep_3 effect is printed beside the predicted one, on its scale (a norm: STAT1's is about 7)
    header = next(line for line in lines if "l2_delta_corrected" in line).split()
    stat1 = next(line for line in lines if line.split()[1:2] == ["ko:STAT1"]).split()
    assert "measured_rep_3" in header and 5 < float(stat1[header.index("measured_rep_3")]) < 10
    assert "replicate vs replicate     +0.84" in printed  # measured rep_1 vs rep_2: independent of the model
    for name in ("ranking.csv", "ranking.parquet", "aggregates.nc", "top_hits.png", "config.json"):
        assert (tmp_path / "demo" / name).exists(), name


def test_cli_error_is_clean(tmp_path):  # (through python -m virtualcell, as well as the virtualcell script)
    r = subprocess.run(
        [sys.executable, "-m", "virtualcell", "encode", "--data", str(tmp_path / "nope.h5ad"), "--out", str(tmp_path / "x.npz")],
        capture_output=True, text=True,
    )
    assert r.returncode == 2
    assert "No such file" in r.stderr and "Traceback" not in r.stderr


def _public_callables():
    from virtualcell import evaluate, objectives, perturbations, screen, simulator, viz

    yield from (vc.encode, vc.decode, vc.fit)
    for cls in (vc.Simulator, vc.SimulationResult, vc.C2SModel, vc.ScreenResult):
        yield from (f for name, f in vars(cls).items() if inspect.isfunction(f) and not name.startswith("_"))
    for mod in (screen, viz, objectives, perturbations, simulator):
        yield from (getattr(mod, n) for n in mod.__all__ if inspect.isfunction(getattr(mod, n)))
    yield from (evaluate.evaluate, evaluate.effect_size, evaluate.split_controls)


def test_public_functions_take_data_first_and_options_keyword_only():
    """scanpy-style signatures: the data (and at most two more objects) positional, every option keyword-only,
    and no boolean that can be passed by position."""
    for fn in _public_callables():
        params = [p for p in inspect.signature(fn).parameters.values() if p.name not in ("self", "cls")]
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        where = f"{fn.__module__}.{fn.__qualname__}"
        assert len(positional) <= 3, where
        assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in params[len(positional):]), where
        assert not any(isinstance(p.default, bool) for p in positional), where


def test_top_level_names_are_verbs_classes_or_namespaces():
    """What `import virtualcell as vc` offers: no module shadows a function, internals are not listed."""
    import types

    assert callable(vc.fit) and not isinstance(vc.fit, types.ModuleType)
    for name in ("Combination", "Perturbation", "Simulator", "SimulationResult", "ScreenResult", "C2SModel",
                 "TrainConfig"):
        assert isinstance(getattr(vc, name), type), name
    for name in ("objectives", "perturbations", "datasets", "evaluate", "screen", "model"):
        assert isinstance(getattr(vc, name), types.ModuleType), name
    assert "prompts" not in vc.__all__ and "prompts" not in dir(vc)
    assert vc.objectives.raise_genes(["STAT1"]).name == "raise"


def test_old_names_warn_for_one_release(papalexi):
    """Simulator(model, baseline), screen.screen and vc.prompts still work, with a DeprecationWarning."""
    import sys as _sys

    import pytest

    from virtualcell.screen import screen

    model = vc.model.bundled()
    base = papalexi[papalexi.obs.perturbation == "control"][:4].copy()
    with pytest.warns(DeprecationWarning, match=r"Simulator\(baseline, model\)"):
        sim = vc.Simulator(model, base)
    assert sim.baseline is base and sim.model is model
    with pytest.warns(DeprecationWarning, match="simulator.screen"):
        res = screen(sim, ["STAT1"], n_cells=2, n_boot=2, progress=False)
    assert list(res.ranking["perturbation"]) == ["ko:STAT1"]
    code = ("import warnings, virtualcell as vc\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    m = vc.prompts\n"
            "print(m.__name__, [str(x.message) for x in w if x.category is DeprecationWarning])")
    out = subprocess.run([_sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("virtualcell.prompts") and "internal" in out
