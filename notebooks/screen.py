# /// script
# requires-python = ">=3.11"
# dependencies = [
#     "marimo>=0.17",
#     "virtualcell",
# ]
# ///
"""Reactive in-silico screening: choose data, model, baseline cells, panel and objective; rank the panel."""

import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium", app_title="virtualcell: in-silico screen")


@app.cell
def _():
    import marimo as mo

    import virtualcell as vc
    from virtualcell import viz

    return mo, vc, viz


@app.cell
def _(mo):
    mo.md(r"""
    # In-silico screen

    Pick a dataset and a model, the baseline cells to perturb, a panel of perturbations and
    what a good hit does. The model predicts every perturbed population; the table ranks the
    panel with 95% confidence intervals and marks a diverse shortlist for the wet lab.

    With the settings as they open (the embedded Papalexi 2021 screen, the bundled model,
    control cells of the held-out replicate `rep_3`) the screen runs at once. After you change
    a setting, press **Run the screen**.
    """)
    return


@app.cell
def _(mo, viz):
    data_source = mo.ui.dropdown(viz.DATA_CHOICES, value=next(iter(viz.DATA_CHOICES)), label="dataset")
    data_path = mo.ui.text(placeholder="path/to/screen.h5ad", label=".h5ad path", full_width=True)
    data_loader = mo.ui.dropdown(viz.pertpy_loaders(), label="pertpy loader")
    model_source = mo.ui.dropdown(viz.MODEL_CHOICES, value=next(iter(viz.MODEL_CHOICES)), label="model")
    model_path = mo.ui.text(placeholder="model/ or vandijklab/C2S-Scale-Gemma-2-2B", label="folder or hub id",
                            full_width=True)
    mo.vstack([mo.hstack([data_source, data_path, data_loader]), mo.hstack([model_source, model_path])])
    return data_loader, data_path, data_source, model_path, model_source


@app.cell
def _(data_loader, data_path, data_source, mo, viz):
    _value = viz.chosen_data(data_source.value, path=data_path.value, loader=data_loader.value)
    mo.stop(_value is None, mo.md("Give the .h5ad path or pick a pertpy loader."))
    adata = viz.load_data(data_source.value, _value)
    return (adata,)


@app.cell
def _(adata, mo, model_path, model_source, viz):
    mo.stop(model_source.value != "bundled" and not model_path.value, mo.md("Give the model folder or hub id."))
    model = viz.load_model(model_source.value, model_path.value, fit_on=adata)
    contract = viz.data_contract(adata, model)  # the data's stored contract, else the model's columns
    mo.md(f"**data** {adata.n_obs:,} cells x {adata.n_vars} genes &nbsp; **model** `{model!r}`")
    return contract, model


@app.cell
def _(adata, contract, mo):
    _columns = [c for c in adata.obs.columns if adata.obs[c].nunique() <= 50 and c != contract.perturbation_key]
    _default = contract.context_key or ("bio_rep" if "bio_rep" in _columns else None)
    filter_column = mo.ui.dropdown(_columns, value=_default, label="baseline: only control cells where")
    filter_column
    return (filter_column,)


@app.cell
def _(adata, filter_column, mo, model):
    _values = sorted(adata.obs[filter_column.value].astype(str).unique()) if filter_column.value else []
    _lo, _hi, _step = 8, 400, 8  # the baseline cells' slider
    _n_cells = int(mo.cli_args().get("n_cells", 40))  # e.g. marimo export html notebooks/screen.py -- --n_cells 200
    if not (_lo <= _n_cells <= _hi and _n_cells % _step == 0):
        raise ValueError(f"--n_cells {_n_cells}: the baseline cells' slider takes {_lo} to {_hi} in steps of {_step}.")
    DEFAULTS = {
        "filter_value": "rep_3" if "rep_3" in _values else None,
        "n_cells": _n_cells,
        "panel": "ko:STAT1\nko:JAK2\nko:IFNGR1\nko:IRF1\nko:CD86\nko:SMAD4\n",
        "picked": [],
        "objective": "largest",
        "genes": "PSMB9,STAT1",
        "top": 3,
        "prior": bool(model.setting("coexpression_prior")),  # as the training run chose (on where it could not)
    }
    form = mo.ui.dictionary({
        "filter_value": mo.ui.dropdown(_values, value=DEFAULTS["filter_value"], label="equals"),
        "n_cells": mo.ui.slider(_lo, _hi, step=_step, value=DEFAULTS["n_cells"], label="baseline cells", show_value=True),
        "panel": mo.ui.text_area(value=DEFAULTS["panel"], label="panel (one a line: ko:STAT1, kd:MYC, act:KLF1, "
                                 "drug:X@1uM,24h, ko:A + ko:B)", rows=6, full_width=True),
        "picked": mo.ui.multiselect(model.perturbations.panel(), value=DEFAULTS["picked"],
                                    label="and/or pick from what the model knows"),
        "objective": mo.ui.dropdown({"largest effect": "largest", "raise genes": "raise", "lower genes": "lower",
                                     "signature (UP,UP/DOWN,DOWN)": "signature",
                                     "reverse a signature (UP,UP/DOWN,DOWN)": "reverse"},
                                    value="largest effect", label="objective"),
        "genes": mo.ui.text(value=DEFAULTS["genes"], label="genes or signature", full_width=True),
        "top": mo.ui.number(1, 20, value=DEFAULTS["top"], label="diverse picks"),
        "prior": mo.ui.checkbox(value=DEFAULTS["prior"], label="knockouts the model never trained on: with the "
                                "coexpression prior (off: the model alone)"),
    })
    run = mo.ui.run_button(label="Run the screen")
    mo.vstack([
        mo.hstack([form["filter_value"], form["n_cells"]], justify="start"),
        form["panel"], form["picked"],
        mo.hstack([form["objective"], form["genes"], form["top"]], justify="start"),
        form["prior"],
        run,
    ])
    return DEFAULTS, form, run


@app.cell
def _(DEFAULTS, adata, contract, data_source, filter_column, form, mo, model, model_source, run, vc, viz):
    # on opening, the embedded default runs; any other choice (another filter column rebuilds the form at its own
    # defaults) waits for the button
    _at_defaults = (data_source.value == "embedded" and model_source.value == "bundled"
                    and filter_column.value == (contract.context_key or "bio_rep") and form.value == DEFAULTS)
    mo.stop(not (run.value or _at_defaults), mo.md("Press **Run the screen** to screen with these settings."))
    baseline = viz.baseline_cells(adata, contract=contract, n_cells=form.value["n_cells"],
                                  where={filter_column.value: form.value["filter_value"]} if filter_column.value else None)
    sim = vc.Simulator(baseline, model, genes="shared", seed=0)
    _objective = form.value["objective"]
    if _objective != "largest":
        _objective = f"{_objective}:{form.value['genes']}"
    with mo.status.spinner(title="Screening..."):
        result = sim.screen(viz.panel(form.value["panel"], form.value["picked"]), objective=_objective,
                            top=form.value["top"], seed=0, progress=False, keep_cells=True,
                            coexpression_prior=form.value["prior"])
    return result, sim


@app.cell
def _(mo, result):
    _cols = ["rank", "perturbation", "score", "score_low", "score_high", "edistance", "l2_delta_corrected",
             "n_cells", "trained", "pick", "similar_to_pick", "top_up", "top_down"]
    _table = result.ranking[_cols].assign(top_up=result.ranking["top_up"].str.join(", "),
                                          top_down=result.ranking["top_down"].str.join(", "))
    mo.vstack([
        mo.md(f"## Ranking ({result.aggregates.attrs['objective']}; score with 95% CI from `score_low` to "
              "`score_high`)"),
        mo.ui.table(_table.round(3), selection=None, page_size=15),
        mo.md("## Diverse picks for the wet lab"),
        mo.ui.table(result.picks()[["rank", "perturbation", "score", "score_low", "score_high"]]
                    .assign(represents=result.picks()["represents"].str.join(", ")).round(3).reset_index(drop=True),
                    selection=None),
    ])
    return


@app.cell
def _(mo, result):
    mo.vstack([mo.md("## Top hits and their top genes"), result.plot_top_hits(n=10, return_fig=True)])
    return


@app.cell
def _(mo, result):
    mo.stop(result.dose_series().empty,
            mo.md("*Dose-response: put a drug or cytokine at two or more doses in the panel (e.g. "
                  "`drug:NAME@0.1uM`, `drug:NAME@1uM`, `drug:NAME@10uM`) to see its effect by dose.*"))
    mo.vstack([mo.md("## Dose-response (score with 95% CI, and the genes that change most)"),
               result.plot_dose_response(return_fig=True)])
    return


@app.cell
def _(mo, result):
    mo.stop(result.time_series().empty)  # a time course: one agent at one dose and two or more times
    mo.vstack([mo.md("## Time course (score with 95% CI, and the genes that change most)"),
               result.plot_time_course(return_fig=True)])
    return


@app.cell
def _(adata, contract, filter_column, form, mo, result, sim, viz):
    _top = list(result.picks()["perturbation"][:3])
    _measured = viz.measured_cells(adata, sim.model, _top, contract=contract, n_cells=form.value["n_cells"],
                                   where={filter_column.value: form.value["filter_value"]} if filter_column.value else None)
    mo.vstack([
        mo.md("## Baseline, predicted and measured cells (PCA of the baseline)"),
        viz.plot_pca(viz.screen_pca(sim, result, measured=_measured, perturbations=_top), return_fig=True),
    ])
    return


if __name__ == "__main__":
    app.run()
