# /// script
# requires-python = ">=3.11"
# dependencies = [
#     "marimo>=0.17",
#     "virtualcell",
# ]
# ///
"""Predicted vs measured: hold out a replicate or perturbations, predict them, score the prediction."""

import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium", app_title="virtualcell: predicted vs measured")


@app.cell
def _():
    import marimo as mo

    import virtualcell as vc
    from virtualcell import viz

    return mo, vc, viz


@app.cell
def _(mo):
    mo.md(r"""
    # Predicted vs measured

    Hold out measured cells the model did not learn from, predict them from their own
    control cells, and score the prediction next to simple baselines and the noise ceiling
    (half of every measured group against the other half).

    The control cells of the held-out cells are split in two independent halves: one is the
    baseline population the model perturbs, the other the reference the measured deltas are
    taken against (`vc.evaluate.split_controls`). The bundled model was trained with
    replicate `rep_3` of the embedded Papalexi 2021 screen held out, so the default compares
    against `rep_3`. Holding out *perturbations* is meaningful with a model trained without
    them (`virtualcell train --holdout perturbation=A,B`).

    With the settings as they open the comparison runs at once; after you change a setting,
    press **Predict and score**.
    """)
    return


@app.cell
def _(mo, viz):
    data_source = mo.ui.dropdown(viz.DATA_CHOICES, value=next(iter(viz.DATA_CHOICES)), label="measured data")
    data_path = mo.ui.text(placeholder="path/to/screen.h5ad", label=".h5ad path", full_width=True)
    data_loader = mo.ui.dropdown(viz.pertpy_loaders(), label="pertpy loader")
    model_source = mo.ui.dropdown(viz.MODEL_CHOICES, value=next(iter(viz.MODEL_CHOICES)), label="model")
    model_path = mo.ui.text(placeholder="model/", label="folder or hub id", full_width=True)
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
    mo.md(f"**measured** {adata.n_obs:,} cells x {adata.n_vars} genes &nbsp; **model** `{model!r}`; trained with "
          f"held out: `{model.train_config.get('holdout') or 'nothing recorded'}`")
    return contract, model


@app.cell
def _(adata, contract, mo):
    _columns = [c for c in adata.obs.columns if 1 < adata.obs[c].nunique() <= 50 and c != contract.perturbation_key]
    holdout_column = mo.ui.dropdown(_columns, value="bio_rep" if "bio_rep" in _columns else None,
                                    label="held-out cells: where")
    holdout_column
    return (holdout_column,)


@app.cell
def _(adata, contract, holdout_column, mo, model, viz):
    _values = sorted(adata.obs[holdout_column.value].astype(str).unique()) if holdout_column.value else []
    measured = viz.measured_labels(model, adata, contract=contract)  # typed -> the measured cells' label
    _known = sorted(measured.values())
    _first = [p for p in ("IFNGR1", "IFNGR2", "JAK2", "STAT1", "IRF1", "SMAD4", "CD86", "ATF2") if p in _known]
    _lo, _hi, _step = 16, 512, 16  # the baseline cells' slider
    _n_cells = int(mo.cli_args().get("n_cells", 64))  # e.g. marimo export html notebooks/compare.py -- --n_cells 128
    if not (_lo <= _n_cells <= _hi and _n_cells % _step == 0):
        raise ValueError(f"--n_cells {_n_cells}: the baseline cells' slider takes {_lo} to {_hi} in steps of {_step}.")
    DEFAULTS = {
        "holdout_value": "rep_3" if "rep_3" in _values else None,
        "perturbations": _first or _known[:8],
        "n_cells": _n_cells,
        "profile": "default",
    }
    form = mo.ui.dictionary({
        "holdout_value": mo.ui.dropdown(_values, value=DEFAULTS["holdout_value"], label="equals"),
        "perturbations": mo.ui.multiselect(_known, value=DEFAULTS["perturbations"],
                                           label="perturbations to predict and score"),
        "n_cells": mo.ui.slider(_lo, _hi, step=_step, value=DEFAULTS["n_cells"], label="baseline cells", show_value=True),
        "profile": mo.ui.dropdown(["default", "fast", "pearson"], value=DEFAULTS["profile"],
                                  label="metrics (default includes E-distances)"),
    })
    run = mo.ui.run_button(label="Predict and score")
    mo.vstack([mo.hstack([form["holdout_value"], form["n_cells"], form["profile"]], justify="start"),
               form["perturbations"], run])
    return DEFAULTS, form, measured, run


@app.cell
def _(DEFAULTS, adata, contract, data_source, form, holdout_column, measured, mo, model, model_source, run, vc, viz):
    # on opening, the embedded default runs; any other choice (another holdout column rebuilds the form at its own
    # defaults, and would score cells the model trained on) waits for the button
    _at_defaults = (data_source.value == "embedded" and model_source.value == "bundled"
                    and holdout_column.value == "bio_rep" and form.value == DEFAULTS)
    mo.stop(not (run.value or _at_defaults), mo.md("Press **Predict and score** to run with these settings."))
    mo.stop(not form.value["perturbations"], mo.md("Pick at least one perturbation."))
    _where = {holdout_column.value: form.value["holdout_value"]} if holdout_column.value else {}
    _where[contract.perturbation_key] = [*contract.controls, *form.value["perturbations"]]
    held = viz.subset(adata, _where)
    # the contract's columns, named: a file with no stored contract has them from the model (viz.data_contract); its
    # dose and time columns, which no argument names, travel with the cells
    contract.attach(held)
    keys = dict(perturbation_key=contract.perturbation_key, control=list(contract.controls),
                context_key=contract.context_key)
    baseline, reference = vc.evaluate.split_controls(held, **keys, seed=0)
    sim = vc.Simulator(viz.baseline_cells(baseline, n_cells=form.value["n_cells"], seed=0), model, genes="shared",
                       seed=0)
    with mo.status.spinner(title="Predicting..."):
        # asked typed (a perturbation held out of training whole has no training label to ask it by)
        _asked = [typed for typed, label in measured.items() if label in set(form.value["perturbations"])]
        predicted = viz.predict_as_measured(sim, _asked, seed=0, contract=contract)
    with mo.status.spinner(title="Scoring..."):
        table = vc.evaluate.evaluate(predicted, reference, baseline=baseline, **keys, profile=form.value["profile"],
                                     seed=0)
    return baseline, keys, predicted, reference, table


@app.cell
def _(mo, table, vc):
    mo.md(vc.evaluate.summarize(table, title="Model vs baselines vs noise ceiling"))
    return


@app.cell
def _(mo, table, vc):
    _metrics = [m for m in ("pearson_delta_top50", "mse_top50", "discrimination", "edistance") if m in set(table["metric"])]
    mo.vstack([
        mo.md("## Metrics per method (mean and standard error over perturbations; hatched: noise ceiling)"),
        vc.evaluate.plot_metric_bars(table, metric=_metrics, return_fig=True),
    ])
    return


@app.cell
def _(baseline, keys, mo, predicted, reference, vc):
    _deltas = vc.evaluate.delta_table(predicted, reference, baseline=baseline, **keys, seed=0)
    mo.vstack([
        mo.md("## Predicted vs measured change of every gene (top 50 measured DE genes coloured)"),
        vc.evaluate.plot_delta_scatter(_deltas, n_top=4, return_fig=True),
    ])
    return


@app.cell
def _(mo, table):
    mo.stop("edistance" not in set(table["metric"]), mo.md("E-distances: choose the `default` metric profile."))
    _ed = table[table["metric"] == "edistance"].pivot_table(index="perturbation", columns="method", values="value")
    mo.vstack([
        mo.md("## E-distance to the measured cells (lower is better; PCA of the measured cells)"),
        mo.ui.table(_ed.round(3).reset_index(), selection=None),
        mo.md("## Every score"),
        mo.ui.table(table.round(4), selection=None, page_size=10),
    ])
    return


if __name__ == "__main__":
    app.run()
