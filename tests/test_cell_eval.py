"""cell-eval as the evaluation engine: profiles through the library, files its own CLI reads."""

from __future__ import annotations

import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import virtualcell as vc
from virtualcell.cli import main
from virtualcell.evaluate import evaluate, split_controls, to_cell_eval


def _screen(n: int = 12, seed: int = 0) -> ad.AnnData:
    """One context, a control and four perturbations with distinct effects; log1p-like values >= 0."""
    rng = np.random.default_rng(seed)
    g = 30
    ctrl = rng.uniform(2.0, 4.0, g)
    means = {"control": ctrl} | {p: ctrl + rng.normal(0, 0.6, g) for p in ["A", "B", "C", "D"]}
    X = np.concatenate([np.clip(m + rng.normal(0, 0.3, (n, g)), 0, None) for m in means.values()])
    obs = pd.DataFrame({"perturbation": np.repeat(list(means), n)}, index=[str(i) for i in range(len(X))])
    a = ad.AnnData(X.astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(g)]))
    vc.DataContract("perturbation", "control").attach(a)
    return a


def _values(table: pd.DataFrame, method: str, metric: str) -> pd.Series:
    sub = table[(table["method"] == method) & (table["metric"] == metric)]
    return sub.set_index("perturbation")["value"].sort_index()


def test_vcc_profile_scores_model_baselines_and_ceiling_with_cell_eval_numbers():
    from cell_eval import MetricsEvaluator

    real = _screen(seed=0)
    pred = _screen(seed=1)  # another draw stands in for a model: same genes and labels
    base, ref = split_controls(real, seed=0)
    table = evaluate(pred, ref, baseline=base, profile="vcc", baselines=("nochange", "pertmean"))
    assert set(table["method"]) == {"model", "nochange", "pertmean", "ceiling"}
    assert set(table["metric"]) == {"overlap_at_N", "mae", "discrimination_score_l1"}
    assert dict(zip(table["metric"], table["direction"])) == {
        "overlap_at_N": "higher", "mae": "lower", "discrimination_score_l1": "higher"}
    assert "cell-eval 0.8.2" in table.attrs["virtualcell"]["engine"]
    # the model's numbers are cell-eval's own, run by hand on the same two files
    ev = MetricsEvaluator(to_cell_eval(pred), to_cell_eval(ref), control_pert="non-targeting",
                          pert_col="target_gene", num_threads=1, outdir=str(__import__("tempfile").mkdtemp()))
    direct = ev.compute(profile="vcc", write_csv=False)[0].to_pandas().set_index("perturbation").sort_index()
    for metric in ["mae", "discrimination_score_l1", "overlap_at_N"]:
        np.testing.assert_allclose(_values(table, "model", metric).to_numpy(), direct[metric].to_numpy(), atol=1e-6)
    summary = vc.evaluate.summarize(table)
    assert "| discrimination_score_l1 | higher |" in summary and "cell-eval" in summary


def test_hand_written_metrics_agree_with_cell_eval_or_differ_as_documented():
    """pearson_delta, mae and mse of virtualcell's registry equal cell-eval's on the same cells; its
    discrimination normalizes the rank by n - 1 candidates where cell-eval's divides by n."""
    real = _screen(seed=0)
    pred = _screen(seed=1)
    base, ref = split_controls(real, seed=0)
    kw = dict(baseline=base, baselines=("pertmean",), ceiling=False)
    ours = evaluate(pred, ref, profile="fast", **kw)
    ce = evaluate(pred, ref, profile="minimal", **kw)
    for method in ["model", "pertmean"]:
        for metric in ["pearson_delta", "mae", "mse"]:
            np.testing.assert_allclose(_values(ours, method, metric).to_numpy(),
                                       _values(ce, method, metric).to_numpy(), rtol=1e-5, atol=1e-7,
                                       err_msg=f"{method} {metric}")
    n = 4  # candidates; no perturbation is named like a gene, so cell-eval excludes no gene
    d_ours = _values(ours, "model", "discrimination").to_numpy()
    d_ce = _values(ce, "model", "discrimination_score_l1").to_numpy()
    np.testing.assert_allclose(d_ce, 1 - (1 - d_ours) * (n - 1) / n, atol=1e-9)


def test_registry_metrics_now_computed_by_cell_eval_equal_the_former_hand_written_ones():
    """pearson_delta, mae and mse of the registry call cell-eval's functions; the numbers are those of
    the formulas virtualcell wrote by hand before (kept here as the reference), nochange included."""
    from virtualcell.evaluate.metrics import METRICS

    real = _screen(seed=0)
    base, ref = split_controls(real, seed=0)
    table = evaluate(_screen(seed=2), ref, baseline=base, profile=["pearson_delta", "mae", "mse"],
                     baselines=("nochange", "pertmean"), ceiling=False)

    def old_pearson(x: np.ndarray, y: np.ndarray) -> float:
        x, y = x - x.mean(), y - y.mean()
        nx, ny = np.sqrt(x @ x), np.sqrt(y @ y)
        return 0.0 if nx < 1e-5 or ny < 1e-5 else float(x @ y / (nx * ny))

    deltas = vc.evaluate.delta_table(_screen(seed=2), ref, baseline=base).set_index(["perturbation", "gene"])
    for p in ["A", "B", "C", "D"]:
        d = deltas.loc[p]
        assert _values(table, "model", "pearson_delta")[p] == pytest.approx(
            old_pearson(d["predicted"].to_numpy(), d["measured"].to_numpy()), abs=1e-6)
    assert (_values(table, "nochange", "pearson_delta") == 0.0).all()  # not cell-eval's NaN
    # mae / mse: the old formulas on the group means
    pred = _screen(seed=2)
    means_p = pd.DataFrame(pred.X, index=pred.obs["perturbation"]).groupby(level=0).mean()
    means_r = pd.DataFrame(ref.X, index=ref.obs["perturbation"]).groupby(level=0).mean()
    for p in ["A", "B", "C", "D"]:
        diff = means_p.loc[p].to_numpy(np.float64) - means_r.loc[p].to_numpy(np.float64)
        assert _values(table, "model", "mae")[p] == pytest.approx(np.mean(np.abs(diff)), rel=1e-5)
        assert _values(table, "model", "mse")[p] == pytest.approx(np.mean(diff**2), rel=1e-5)
    assert METRICS["mae"].fn.__doc__.startswith("cell-eval's")


@pytest.mark.timeout(120)
def test_predict_output_runs_through_cell_evals_own_cli(tiny_model, tmp_path):
    _, path, data = tiny_model
    base_file = tmp_path / "base.h5ad"
    held = data[data.obs["perturbation"].isin(["control", "STAT1", "IFNGR1"])].copy()
    held.write_h5ad(base_file)
    pred = tmp_path / "pred.h5ad"
    assert main(["predict", "--model", str(path), "--data", str(base_file), "--perturbations", "STAT1,IFNGR1",
                 "--n-cells", "20", "--format", "cell-eval", "--out", str(pred)]) == 0
    p = ad.read_h5ad(pred)
    assert set(p.obs["target_gene"]) == {"STAT1", "IFNGR1", "non-targeting"}
    real = tmp_path / "real.h5ad"
    to_cell_eval(held, like=p).write_h5ad(real)  # the documented one-liner's body
    out = tmp_path / "ce"
    run = subprocess.run([sys.executable, "-m", "cell_eval", "run", "-ap", str(pred), "-ar", str(real),
                          "--profile", "vcc", "--num-threads", "1", "-o", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = pd.read_csv(out / "results.csv")
    assert set(results["perturbation"]) == {"STAT1", "IFNGR1"}
    assert {"mae", "discrimination_score_l1", "overlap_at_N"} <= set(results.columns)
    assert results["mae"].notna().all()


def test_the_cell_eval_file_written_a_perturbation_at_a_time_is_the_whole_converted_at_once(tiny_model, tmp_path):
    """predict --format cell-eval held the whole prediction in memory several times over (to_anndata, a dense copy of
    the controls, a concat, the conversion); it now converts and appends one perturbation at a time. The file is the
    one converting everything at once gives."""
    import virtualcell as vc

    model, path, data = tiny_model
    base_file = tmp_path / "base.h5ad"
    base = data[data.obs["perturbation"] == "control"][:10].copy()
    base.write_h5ad(base_file)
    pred = tmp_path / "pred.h5ad"
    assert main(["predict", "--model", str(path), "--data", str(base_file), "--perturbations", "STAT1,IFNGR1,JAK2",
                 "--seed", "3", "--format", "cell-eval", "--out", str(pred)]) == 0
    streamed = ad.read_h5ad(pred)
    sim = vc.Simulator(base, model, seed=3)
    res = sim.simulate(["STAT1", "IFNGR1", "JAK2"], seed=3, progress=False, keep_cells=True)
    cells = res.to_anndata(perturbation_key="perturbation")
    ctrl = ad.AnnData(sim.expression[:10].toarray(), var=cells.var.copy())
    ctrl.obs["perturbation"], ctrl.obs["source_cell"] = "control", list(res.source_cells)
    ctrl.obs_names = [f"control|{c}" for c in res.source_cells]
    whole = to_cell_eval(ad.concat([cells, ctrl], merge="same"), perturbation_key="perturbation", control="control")
    assert list(streamed.obs_names) == list(whole.obs_names) and list(streamed.var_names) == list(whole.var_names)
    assert list(streamed.obs["target_gene"]) == list(whole.obs["target_gene"])
    for column in whole.obs.columns:  # the columns the whole had, alike; and none left empty in the control rows
        assert list(streamed.obs[column].astype(str)) == list(whole.obs[column].astype(str)), column
    assert not streamed.obs.isna().any().any() and (streamed.obs["perturbation_typed"] == "control").sum() == 10
    assert not list(tmp_path.glob(".vc-predict-*"))  # the scratch file went with the command's temporary folder
    np.testing.assert_allclose(streamed.X.toarray(), whole.X.toarray(), atol=1e-6)
    assert streamed.uns["virtualcell"]["cell_eval"] == whole.uns["virtualcell"]["cell_eval"]


def test_cli_evaluate_vcc_prints_cell_eval_metrics_for_model_baselines_and_ceiling(tmp_path, capsys, monkeypatch):
    from virtualcell.evaluate import _core

    real, pred = _screen(seed=0), _screen(seed=1)
    real.write_h5ad(tmp_path / "real.h5ad")
    pred.write_h5ad(tmp_path / "pred.h5ad")
    calls = []
    real_setup = _core._setup
    monkeypatch.setattr(_core, "_setup", lambda *a, **k: calls.append(1) or real_setup(*a, **k))
    assert main(["evaluate", "--pred", str(tmp_path / "pred.h5ad"), "--real", str(tmp_path / "real.h5ad"),
                 "--baselines", "nochange,pertmean", "--profile", "vcc", "--out", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert "| metric | better | model | nochange | pertmean | ceiling |" in out
    for metric in ["overlap_at_N", "mae", "discrimination_score_l1"]:
        assert f"| {metric} |" in out
    assert len(calls) == 1  # one setup for the table and the delta scatter (issue 14)
    assert (tmp_path / "eval" / "delta_scatter.png").stat().st_size > 0
    table = pd.read_csv(tmp_path / "eval" / "metrics.csv")
    assert set(table["method"]) == {"model", "nochange", "pertmean", "ceiling"}


def test_deltas_from_one_setup_equal_delta_table():
    from virtualcell.evaluate._core import _run

    real, pred = _screen(seed=0), _screen(seed=1)
    base, ref = split_controls(real, seed=0)
    _, deltas = _run(pred, ref, baseline=base, profile="pearson", baselines=(), ceiling=False)
    pd.testing.assert_frame_equal(deltas, vc.evaluate.delta_table(pred, ref, baseline=base))


def test_evaluate_says_what_to_install_without_cell_eval(tmp_path, capsys, monkeypatch):
    real = _screen(seed=0)
    real.write_h5ad(tmp_path / "real.h5ad")
    monkeypatch.setitem(sys.modules, "cell_eval", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'cell-eval>=0.8.2'"):
        evaluate(None, real, profile="vcc", baselines=("nochange",))
    assert main(["evaluate", "--pred", str(tmp_path / "real.h5ad"), "--real", str(tmp_path / "real.h5ad"),
                 "--profile", "vcc", "--out", str(tmp_path / "e")]) == 2
    assert "pip install 'cell-eval>=0.8.2'" in capsys.readouterr().err
    with pytest.raises(ImportError, match=r"pip install 'cell-eval>=0.8.2'"):  # its pearson_delta too
        evaluate(None, real, profile="pearson", baselines=("nochange",), ceiling=False)


def test_a_calibrated_prediction_above_cell_evals_raw_count_heuristic_is_scored():
    """x + decode(perturbed) - decode(control) can pass 15 on the log1p scale for one gene: cell-eval's
    guess that such data are raw counts must not stop the evaluation (seen in protocol 4)."""
    real = _screen(seed=0)
    pred = _screen(seed=1)
    X = np.asarray(pred.X).copy()
    X[pred.obs["perturbation"].to_numpy() == "A", 0] = 15.4
    pred.X = X
    base, ref = split_controls(real, seed=0)
    table = evaluate(pred, ref, baseline=base, profile="vcc", baselines=("nochange",))
    assert np.isfinite(_values(table, "model", "mae")).all()


def test_a_cell_eval_score_leaves_torchs_thread_count_as_it_was():
    """cell-eval's differential expression (pdex) sets numba's OpenMP pool to every core, which torch shares: a
    protocol run held to 1 torch thread generated on every core after its first vcc score, beside another run."""
    import os

    import torch

    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: cell-eval cannot raise the thread count")
    real = _screen(seed=0)
    base, ref = split_controls(real, seed=0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        evaluate(_screen(seed=1), ref, baseline=base, profile="vcc", baselines=("nochange",), threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_to_cell_eval_puts_measured_counts_on_the_predictions_scale_over_its_genes(papalexi):
    """A perfect prediction of 250 of the 299 measured genes (the measured cells on the model's scale: log1p of 1e4 per
    cell over those genes) had MAE 0.05 in the files cell-eval reads, since the measured counts were normalized over
    all 299; evaluate, normalizing over the genes compared, said 0. Now the converted file is the prediction."""
    import anndata as ad

    a = papalexi[papalexi.obs["perturbation"].isin(["control", "STAT1"])][:300].copy()
    genes = list(a.var_names[:250])
    counts = np.asarray(a[:, genes].X.toarray(), dtype=np.float64)
    pred = ad.AnnData(np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32),
                      obs=a.obs[["perturbation"]].copy(), var=pd.DataFrame(index=genes))
    pred.uns["virtualcell"] = {"normalization": "log1p_cp10k"}
    p = to_cell_eval(pred)
    assert p.uns["virtualcell"]["normalization"] == "log1p_cp10k"  # kept, for like= to read
    real = to_cell_eval(a, like=p)
    assert list(real.var_names) == genes
    np.testing.assert_allclose(np.asarray(real.X.todense() if hasattr(real.X, "todense") else real.X),
                               np.asarray(p.X.todense() if hasattr(p.X, "todense") else p.X), atol=1e-5)


def test_to_cell_eval_reads_a_measured_dose_screen_by_the_dose_keys_it_is_given():
    """A measured drug screen without a stored contract (sci-Plex's dose_value beside dose_unit) against a prediction
    naming each dose ('A@10000', as predict names it) was refused: to_cell_eval took no dose keys, so the measured
    cells were 'A' alone. With dose_key=, dose_unit_key= (and time_key=) each dose is a perturbation of its own."""
    from virtualcell.errors import ContractError

    real = _screen(n=12, seed=0)
    real.uns.pop("virtualcell")
    labels = real.obs["perturbation"].astype(str).to_numpy()
    real.obs["dose_value"] = np.where(labels == "control", 0.0, np.where(np.arange(real.n_obs) % 2, 100.0, 10000.0))
    real.obs["dose_unit"] = [np.nan if x == "control" else "nM" for x in labels]
    real.obs["time"] = 24
    pred = real[labels != "control"].copy()
    pred.obs = pd.DataFrame({"perturbation": [f"{p}@{d:g},24h" for p, d in zip(pred.obs["perturbation"],
                                                                               pred.obs["dose_value"])]},
                            index=pred.obs_names)
    like = to_cell_eval(pred, part=True)
    with pytest.raises(vc.errors.DataError, match="not measured here"):
        to_cell_eval(real, like=like)  # the doses unread: measured 'A', predicted 'A@10000,24h'
    keys = dict(dose_key="dose_value", dose_unit_key="dose_unit", time_key="time")
    out = to_cell_eval(real, like=like, **keys)
    assert set(out.obs["target_gene"]) == set(like.obs["target_gene"]) and "A@100,24h" in set(out.obs["target_gene"])
    assert list(out.var_names) == list(like.var_names)
    with pytest.raises(ContractError, match=r"dose unit column 'dose_units'.*Did you mean 'dose_unit'.*--dose-unit-key"):
        to_cell_eval(real, like=like, **{**keys, "dose_unit_key": "dose_units"})
