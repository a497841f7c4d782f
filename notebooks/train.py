# /// script
# requires-python = ">=3.11"
# dependencies = [
#     "marimo>=0.17",
#     "virtualcell",
# ]
# ///
"""Fine-tune on your own screen: pick the data contract columns, set a time budget, watch the loss, save."""

import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium", app_title="virtualcell: fine-tune on your screen")


@app.cell
def _():
    import marimo as mo

    import virtualcell as vc
    from virtualcell import viz

    return mo, vc, viz


@app.cell
def _(mo):
    mo.md(r"""
    # Fine-tune on your own screen

    Tell virtualcell which columns of `adata.obs` describe the screen (the data contract),
    give a time budget, and train. The loss updates while it trains; the model is saved into
    the folder you name, ready for `notebooks/screen.py` (model: local folder) or
    `virtualcell screen --model FOLDER`.

    Without a base model a small gene-level model is trained from scratch (CPU is enough).
    With a base model (a Hugging Face id such as `vandijklab/C2S-Scale-Gemma-2-2B`, or a
    folder) the same code fine-tunes that checkpoint with the C2S prompt; do that on a GPU.

    As it opens, the notebook trains for a few seconds on 1,500 cells of the embedded
    Papalexi 2021 screen, replicate `rep_3` held out. After you change a setting, press **Train**.
    """)
    return


@app.cell
def _(mo, viz):
    data_source = mo.ui.dropdown(viz.DATA_CHOICES, value=next(iter(viz.DATA_CHOICES)), label="screen")
    data_path = mo.ui.text(placeholder="path/to/screen.h5ad", label=".h5ad path", full_width=True)
    data_loader = mo.ui.dropdown(viz.pertpy_loaders(), label="pertpy loader")
    mo.hstack([data_source, data_path, data_loader])
    return data_loader, data_path, data_source


@app.cell
def _(data_loader, data_path, data_source, mo, viz):
    _value = viz.chosen_data(data_source.value, path=data_path.value, loader=data_loader.value)
    mo.stop(_value is None, mo.md("Give the .h5ad path or pick a pertpy loader."))
    adata = viz.load_data(data_source.value, _value)
    mo.md(f"**{adata.n_obs:,} cells x {adata.n_vars} genes**; obs columns: {', '.join(map(str, adata.obs.columns))}")
    return (adata,)


@app.cell
def _(adata, mo):
    _columns = [str(c) for c in adata.obs.columns if adata.obs[c].nunique() < min(5000, adata.n_obs)]
    perturbation_key = mo.ui.dropdown(_columns, value="perturbation" if "perturbation" in _columns else None,
                                      label="perturbation column")
    perturbation_key
    return (perturbation_key,)


@app.cell
def _(adata, mo, perturbation_key):
    mo.stop(perturbation_key.value is None, mo.md("Pick the perturbation column."))
    _labels = sorted(adata.obs[perturbation_key.value].astype(str).unique())
    _columns = [str(c) for c in adata.obs.columns if 1 < adata.obs[c].nunique() <= 100 and c != perturbation_key.value]
    _cli = mo.cli_args()  # e.g. marimo export html notebooks/train.py -o train.html -- --base FOLDER --minutes 5
    from virtualcell.perturbations import looks_like_control

    # the control label: 'control', else the labels that look like one; never a guess among the perturbations
    DEFAULTS = {
        "control": ["control"] if "control" in _labels else [x for x in _labels if looks_like_control(x)][:1],
        "context_key": None,
        "kind": "auto",
        "holdout_key": "bio_rep" if "bio_rep" in _columns else None,
        "holdout_value": "rep_3",
        "n_cells": int(_cli.get("n_cells", 1500)),
        "minutes": float(_cli.get("minutes", 2.0)),  # a budget, not a target: 30 steps end first
        "max_steps": int(_cli.get("max_steps", 30)),
        "hidden_size": 64,
        "layers": 2,
        "top_k": 100,
        "base": str(_cli.get("base", "")),
        "out": str(_cli.get("out", "my-model")),
    }
    form = mo.ui.dictionary({
        "control": mo.ui.multiselect(_labels, value=DEFAULTS["control"], label="control label(s)"),
        "context_key": mo.ui.dropdown(_columns, value=DEFAULTS["context_key"], label="context column (optional)"),
        "kind": mo.ui.dropdown(["auto", "knockout", "knockdown", "activation", "drug", "cytokine", "label"],
                               value=DEFAULTS["kind"], label="perturbation kind"),
        "holdout_key": mo.ui.dropdown(_columns, value=DEFAULTS["holdout_key"], label="hold out cells where"),
        "holdout_value": mo.ui.text(value=DEFAULTS["holdout_value"], label="equals (comma-separated)"),
        "n_cells": mo.ui.number(100, 10_000_000, step=100, value=DEFAULTS["n_cells"], label="train on at most cells"),
        "minutes": mo.ui.number(0.1, 24 * 60, step=0.1, value=DEFAULTS["minutes"], label="time budget (minutes)"),
        "max_steps": mo.ui.number(10, 1_000_000, step=10, value=DEFAULTS["max_steps"], label="at most steps"),
        "hidden_size": mo.ui.dropdown([32, 64, 96, 128, 256], value=DEFAULTS["hidden_size"], label="hidden size"),
        "layers": mo.ui.number(1, 12, value=DEFAULTS["layers"], label="layers"),
        "top_k": mo.ui.number(20, 1000, step=10, value=DEFAULTS["top_k"], label="genes per cell sentence"),
        "base": mo.ui.text(value=DEFAULTS["base"], placeholder="empty: new small model; or vandijklab/C2S-Scale-Gemma-2-2B",
                           label="base model (GPU)", full_width=True),
        "out": mo.ui.text(value=DEFAULTS["out"], label="save to folder"),
    })
    run = mo.ui.run_button(label="Train")
    mo.vstack([
        mo.md("**Data contract**"),
        mo.hstack([form["control"], form["context_key"], form["kind"]], justify="start"),
        mo.hstack([form["holdout_key"], form["holdout_value"]], justify="start"),
        mo.md("**Budget and model**"),
        mo.hstack([form["n_cells"], form["minutes"], form["max_steps"]], justify="start"),
        mo.hstack([form["hidden_size"], form["layers"], form["top_k"]], justify="start"),
        form["base"], form["out"], run,
    ])
    return DEFAULTS, form, run


@app.cell
def _(DEFAULTS, adata, data_path, data_source, form, mo, perturbation_key, run, vc, viz):
    # on opening, the embedded screen trains for a few seconds; any other choice (another perturbation column rebuilds
    # the form at its own defaults) waits for the button
    _at_defaults = (data_source.value == "embedded" and perturbation_key.value == "perturbation"
                    and form.value == DEFAULTS)
    mo.stop(not (run.value or _at_defaults), mo.md("Press **Train** to train with these settings."))
    from virtualcell.train import TrainConfig, train
    from virtualcell.validation import candidate_lines, summary_line

    _f = form.value
    mo.stop(not _f["control"], mo.md("Pick the label of the control cells (several: all are read as the first)."))
    contract = vc.DataContract(perturbation_key.value, _f["control"][0], context_key=_f["context_key"],
                               other_controls=tuple(_f["control"][1:]))
    config = TrainConfig(
        top_k=_f["top_k"], hidden_size=_f["hidden_size"], n_layers=_f["layers"], n_heads=4,
        max_steps=int(_f["max_steps"]), max_minutes=_f["minutes"], eval_every=max(1, int(_f["max_steps"]) // 4),
        save_every=10**9, warmup_steps=min(50, int(_f["max_steps"]) // 5), kind=_f["kind"], seed=0,
        holdout={_f["holdout_key"]: _f["holdout_value"].split(",")} if _f["holdout_key"] else {},
    )
    live = viz.LiveLoss(mo.output.replace, every=10)
    model = train(viz.sample(adata, _f["n_cells"], seed=0), out=_f["out"], contract=contract, config=config,
                  base=_f["base"] or None, resume=False, progress=False, on_log=live)
    _data = "papalexi2021" if data_source.value == "embedded" else (data_path.value or "YOUR_SCREEN.h5ad")
    mo.output.replace(mo.vstack([
        mo.md(f"## Trained: `{model!r}`, saved to `{_f['out']}` (each press of Train starts over there)"),
        viz.plot_history(live.history, return_fig=True),
        mo.md(f"{len(live.history)} steps; last training loss {live.history[-1]['loss']:.3f}, validation loss "
              f"{live.history[-1].get('val_loss', float('nan')):.3f}. Screen with it: "
              f"`virtualcell screen --model {_f['out']} --data {_data} --panel panel.txt --out screen/`, "
              "or open `notebooks/screen.py` and choose *local folder*."),
        mo.md(f"**Validation verdict** (cells held out of training; how far to trust the model): "
              f"{summary_line(model.verdict)}"),
        mo.md("Generation settings the verdict tried (pure model; the lowest MSE is chosen):\n\n```\n"
              + "\n".join(candidate_lines(model.verdict)) + "\n```") if candidate_lines(model.verdict) else mo.md(""),
    ]))
    return


if __name__ == "__main__":
    app.run()
