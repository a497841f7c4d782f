"""The marimo notebooks: each exports headless on the embedded default, `marimo check` is clean,
and the helpers behind them (virtualcell.viz) do what the notebooks rely on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
MARIMO = [sys.executable, "-m", "marimo"]
# one torch thread: the notebooks share the machine with other jobs
ENV = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}

# what each notebook must show when it runs on the embedded default
EXPECTED = {
    "screen": ["score_low", "score_high", "Diverse picks for the wet lab", "PCA of the baseline", "ko:JAK2"],
    "compare": ["Model vs baselines vs noise ceiling", "pearson_delta_top50", "ceiling", "E-distance to the measured"],
    "train": ["Trained:", "steps; last training loss"],
}
# arguments after `--` (mo.cli_args): fewer baseline cells than the notebooks open with (40 and 64), which
# halves the two exports' time; every cell still runs on the embedded default's data and model
ARGS = {"screen": ["--n_cells", "16"], "compare": ["--n_cells", "16"], "train": []}


def test_marimo_check_is_clean():
    res = subprocess.run([*MARIMO, "check", "--strict", "--ignore-scripts", str(NOTEBOOKS)],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "warning" not in (res.stdout + res.stderr).lower(), res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_exports_headless(name, tmp_path):
    """`marimo export html` runs every cell and exits non-zero if any cell fails."""
    out = tmp_path / f"{name}.html"
    res = subprocess.run([*MARIMO, "export", "html", str(NOTEBOOKS / f"{name}.py"), "-o", str(out), "-f",
                          "--no-include-code", "--", *ARGS[name]],
                         capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=380)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    html = out.read_text()
    for text in EXPECTED[name]:
        assert text in html, f"{name}: {text!r} is not in the exported notebook"
    assert "with these settings" not in html, f"{name}: a run-gated cell stopped on the defaults"
    if name == "train":
        assert (tmp_path / "my-model" / "virtualcell.json").exists()


# --------------------------------------------------------------------------- #
# virtualcell.viz
# --------------------------------------------------------------------------- #
def test_viz_import_is_light():
    code = ("import sys, virtualcell, virtualcell.viz; "
            "print([m for m in ('torch', 'transformers', 'pertpy', 'matplotlib') if m in sys.modules])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr


def test_panel_and_sources():
    from virtualcell import viz
    from virtualcell.errors import DataError

    assert [str(p) for p in viz.panel("ko:STAT1\n# a comment\n\nko:JAK2 + ko:IRF1\n", ["ko:STAT1", "ko:CD86"])] == [
        "ko:STAT1", "ko:IRF1 + ko:JAK2", "ko:CD86"]
    with pytest.raises(DataError, match="path of an .h5ad"):
        viz.load_data("h5ad", "")
    with pytest.raises(DataError, match="Unknown data source"):
        viz.load_data("s3")
    with pytest.raises(DataError, match="Unknown model source"):
        viz.load_model("ftp")
    assert "norman_2019" in viz.pertpy_loaders()
    assert viz.panel("", ["ko:STAT1"]) == ["ko:STAT1"]  # picks alone
    assert [str(p) for p in viz.panel("# only a comment\n", ["ko:STAT1"])] == ["ko:STAT1"]


def test_h5ad_without_contract_is_read_as_is(papalexi_small, tmp_path):
    from virtualcell import viz

    bare = papalexi_small[:50].copy()
    bare.uns.pop("virtualcell", None)
    path = tmp_path / "bare.h5ad"
    bare.write_h5ad(path)
    assert viz.load_data("h5ad", str(path)).n_obs == 50
    # the screen and compare notebooks read its columns from the model (they had no way to name them)
    import virtualcell as vc

    contract = viz.data_contract(viz.load_data("h5ad", str(path)), vc.C2SModel.load())
    assert (contract.perturbation_key, contract.control) == ("perturbation", "control")
    bare.obs = bare.obs.rename(columns={"perturbation": "guide"})
    with pytest.raises(vc.errors.ContractError, match="no stored contract.*obs columns"):
        viz.data_contract(bare, vc.C2SModel.load())


def test_baseline_cells_subset_sample(papalexi):
    from virtualcell import viz
    from virtualcell.errors import DataError

    base = viz.baseline_cells(papalexi, n_cells=40, where={"bio_rep": "rep_3"}, seed=0)
    assert base.n_obs == 40 and set(base.obs["perturbation"]) == {"control"} and set(base.obs["bio_rep"]) == {"rep_3"}
    assert list(base.obs_names) == list(viz.baseline_cells(papalexi, n_cells=40, where={"bio_rep": "rep_3"}).obs_names)
    with pytest.raises(DataError, match="No control cells"):
        viz.baseline_cells(papalexi, where={"bio_rep": "rep_9"})
    sub = viz.subset(papalexi, {"perturbation": ["control", "STAT1"], "bio_rep": None})
    assert set(sub.obs["perturbation"]) == {"control", "STAT1"}
    assert viz.sample(papalexi, 100, seed=1).n_obs == 100


def test_pca_frame_and_plots():
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("svg")  # the library must not switch the caller's backend
    from virtualcell import viz

    rng = np.random.default_rng(0)
    base = rng.normal(size=(30, 12))
    frame = viz.pca_frame(base, {"ko:A (predicted)": base + 1, "ko:A (measured)": base[:5] + 1},
                          kind={"ko:A (predicted)": "predicted", "ko:A (measured)": "measured"})
    assert list(frame.columns) == ["pc1", "pc2", "group", "kind"] and len(frame) == 65
    assert abs(frame["pc1"].mean()) < 1e-5  # the axes of every cell plotted, not the baseline's own
    fig = viz.plot_pca(frame, return_fig=True)
    (ax,) = fig.axes
    offsets = [c.get_offsets() for c in ax.collections]  # baseline, then each group in order
    assert [len(o) for o in offsets] == [30, 30, 5]
    np.testing.assert_allclose(offsets[1], frame.loc[frame["group"] == "ko:A (predicted)", ["pc1", "pc2"]])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["baseline", "ko:A (predicted)", "ko:A (measured)"]
    # one colour per perturbation: predicted and measured cells of ko:A share it
    def colour(c):  # noqa: ANN001, ANN202
        return (c.get_facecolor() if len(c.get_facecolor()) else c.get_edgecolor())[0][:3]

    np.testing.assert_allclose(colour(ax.collections[1]), colour(ax.collections[2]))
    assert ax.get_xlabel() == "PC1 of baseline" and matplotlib.get_backend().lower() == "svg"
    plt.close(fig)
    fig, ax = plt.subplots()
    assert viz.plot_pca(frame, ax=ax) is None and len(ax.collections) == 3  # draws into the given axes
    plt.close(fig)
    shown = []
    live = viz.LiveLoss(shown.append, every=2)
    for step in range(1, 6):
        live({"step": step, "loss": 5.0 - step, "phase": 0.0 if step < 2 else 1.0} | ({"val_loss": 1.0} if step == 5 else {}))
    assert len(live.history) == 5 and len(shown) == 3  # steps 2, 4 and the validation at 5


@pytest.mark.slow
def test_predict_as_measured_is_ready_for_evaluate(papalexi):
    import virtualcell as vc
    from virtualcell import viz

    model = vc.model.bundled()
    base = viz.baseline_cells(papalexi, n_cells=8, where={"bio_rep": "rep_3"})
    sim = vc.Simulator(base, model, seed=0)
    pred = viz.predict_as_measured(sim, ["STAT1", "JAK2"], seed=0)
    assert pred.n_obs == 3 * 8
    assert sorted(set(pred.obs["perturbation"])) == ["JAK2", "STAT1", "control"]
    assert vc.DataContract.from_adata(pred) == vc.DataContract("perturbation", "control")
    labels = viz.measured_labels(model, papalexi)
    assert labels["ko:STAT1"] == "STAT1"
    cells = viz.measured_cells(papalexi, model, ["ko:STAT1", "ko:NOTAGENE"], n_cells=5, where={"bio_rep": "rep_3"})
    assert list(cells) == ["ko:STAT1"] and cells["ko:STAT1"].shape == (5, len(model.genes))
    res = sim.simulate(["ko:STAT1"], seed=0, keep_cells=True, progress=False)
    frame = viz.screen_pca(sim, res, measured=cells)
    assert set(frame["group"]) == {"baseline", "ko:STAT1 (predicted)", "ko:STAT1 (measured)"}
    # the screen keeps the same per-cell predictions: the notebook plots them without simulating again
    screened = sim.screen(["STAT1", "JAK2"], seed=0, n_boot=5, keep_cells=True, progress=False)
    np.testing.assert_allclose(screened.cells.sel(perturbation="ko:STAT1").values,
                               res.cells.sel(perturbation="ko:STAT1").values)
    again = viz.screen_pca(sim, screened, measured=cells, perturbations=["ko:STAT1"])
    np.testing.assert_allclose(again[["pc1", "pc2"]].to_numpy(), frame[["pc1", "pc2"]].to_numpy(), atol=1e-5)


@pytest.mark.slow
def test_load_model_fits_a_codec_for_a_plain_hf_checkpoint(papalexi_small, tmp_path):
    """A plain Hugging Face folder (no virtualcell.json) gets a rank fit on the data it will see."""
    import virtualcell as vc
    from virtualcell import viz
    from virtualcell.model import BUNDLED

    assert viz.load_model("folder", BUNDLED).rank_fit is not None
    bundled = vc.model.bundled()
    bundled.lm.save_pretrained(tmp_path / "plain")
    bundled.tokenizer.save_pretrained(tmp_path / "plain")
    model = viz.load_model("hub", str(tmp_path / "plain"), fit_on=papalexi_small)
    assert model.format.name == "c2s" and model.rank_fit is not None
    assert len(model.genes) == papalexi_small.n_vars
