"""Serving a cytokine screen's model: its labels asked as strings or parsed, its hints, and its evaluation.

A cytokine screen names its cytokines by their genes (IFNG, TNF) and gives each one dose: the model's labels resolve
to that dose whichever way they come, its hints suggest only kinds it trained on, evaluate's coexpression baseline
reads none of them as a perturbation of its gene, and cell-eval's export says which column a dosed prediction needs.
"""

from __future__ import annotations

import numpy as np
import pytest

import virtualcell as vc
from virtualcell.errors import DataError, PerturbationError
from virtualcell.perturbations import parse_panel

from conftest import trained_tiny

# the synthetic screen's cytokines, named by genes of the data as a cytokine screen names them (each at dose 1)
NAMES = {"CYTO1": "TF05", "CYTO2": "TF06", "CYTO3": "TF05+TF06"}


@pytest.fixture(scope="module")
def cyto():
    """Controls and three cytokines, one a pair, each named by genes of the data, at one dose each."""
    data = vc.datasets.synthetic_screen(n_genes=40, n_tfs=8, n_knockouts=2, n_pairs=0, n_drugs=0, n_cytokines=3,
                                        n_cells_per_condition=30, n_control_cells=90, n_contexts=1, seed=0)
    data = data[data.obs["perturbation_type"].isin(["control", "cytokine"]).to_numpy()].copy()
    data.obs["perturbation"] = data.obs["perturbation"].astype(str).replace(NAMES)
    return data


@pytest.fixture(scope="module")
def cyto_model(cyto, tmp_path_factory):
    return trained_tiny(cyto, tmp_path_factory.mktemp("cyto_model"))


def test_a_label_resolves_to_its_one_dose_whether_a_string_or_parsed(cyto_model):
    vocab = cyto_model.perturbations
    assert vocab.trained_kinds() == {"cytokine"}
    for asked in ("TF05", "TF05+TF06", "TF05+TF06@1", "TF06+TF05@1"):
        as_string = [str(p) for p in cyto_model.resolve([asked])]
        assert [str(p) for p in cyto_model.resolve(parse_panel(asked))] == as_string, asked
        # and a resolved name resolves to itself (a screen simulates its groups by name)
        assert [str(p) for p in cyto_model.resolve(as_string)] == as_string
    assert [str(p) for p in cyto_model.resolve(parse_panel("TF05"))] == ["cytokine:TF05@1"]


def test_a_screen_of_a_parsed_panel_ranks_each_label_at_its_trained_dose(cyto, cyto_model, tmp_path):
    ctrl = cyto[cyto.obs["perturbation"] == "control"][:8].copy()
    sim = vc.Simulator(ctrl, cyto_model)
    res = sim.screen(parse_panel("TF05\nTF05+TF06@1"), objective="raise:TF05", progress=False, n_boot=10,
                     out=tmp_path / "screen")
    ranking = res.ranking.set_index("perturbation")
    assert set(ranking.index) == {"cytokine:TF05@1", "cytokine:TF05@1 + cytokine:TF06@1"}
    assert set(ranking["label"]) == {"TF05@1", "TF05+TF06@1"} and ranking["trained"].all()


def test_a_screen_whose_names_resolve_again_to_another_perturbation_ranks_that_one(cyto, cyto_model, tmp_path,
                                                                                  monkeypatch):
    from virtualcell.perturbations import parse, parts_of
    from virtualcell.prompts import PerturbationVocab

    resolve = PerturbationVocab._resolve

    def dose_dropped(self, p):  # as a parsed label resolved before: its trained dose left out
        if not isinstance(p, str) and all(x.kind == "label" for x in parts_of(p)):
            return parse(self.labels[p.target])
        return resolve(self, p)

    monkeypatch.setattr(PerturbationVocab, "_resolve", dose_dropped)
    assert [str(p) for p in cyto_model.resolve(parse_panel("TF05"))] == ["cytokine:TF05"]
    ctrl = cyto[cyto.obs["perturbation"] == "control"][:8].copy()
    res = vc.Simulator(ctrl, cyto_model).screen(parse_panel("TF05"), objective="raise:TF05", progress=False,
                                                n_boot=10)  # (it stopped in a KeyError)
    assert list(res.ranking["perturbation"]) == ["cytokine:TF05@1"] and list(res.ranking["label"]) == ["TF05@1"]
    assert res.ranking["trained"].all()


def test_an_unknown_gene_is_hinted_only_in_kinds_the_model_trained_on(cyto_model):
    for asked in ("IL6", "IL6 KO"):
        with pytest.raises(PerturbationError) as err:
            cyto_model.resolve([asked])
        said = str(err.value)
        assert "ko:IL6" not in said and "trained on no knockout" in said and "cytokines" in said, said


def test_a_knockout_screen_s_hint_names_the_knockout_and_how_its_labels_trained():
    from virtualcell.prompts import PerturbationVocab

    vocab = PerturbationVocab(labels={"STAT1": "ko:STAT1"})
    with pytest.raises(PerturbationError, match=r"e\.g\. 'ko:IL6' \(as it trained its label 'STAT1': ko:STAT1\)\."):
        vocab.resolve("IL6")
    plain = PerturbationVocab()  # no training labels recorded: every kind may be meant
    with pytest.raises(PerturbationError, match=r"e\.g\. 'ko:IL6' \(or kd:, act:, drug:NAME@DOSE\)"):
        plain.resolve("IL6")


def test_the_coexpression_baseline_scores_no_cytokine_named_by_its_gene():
    from virtualcell.evaluate import baselines
    from virtualcell.evaluate.baselines import Effects

    data = vc.datasets.synthetic_screen(n_genes=40, n_tfs=8, n_knockouts=4, n_pairs=0, n_drugs=0, n_cytokines=2,
                                        n_cells_per_condition=30, n_control_cells=90, n_contexts=1, seed=0)
    data.obs["perturbation"] = data.obs["perturbation"].astype(str).replace({"CYTO1": "GENE001", "CYTO2": "GENE002"})
    knockouts = set(data.obs["perturbation"][data.obs["perturbation_type"] == "knockout"].astype(str))
    # a dosed condition ('GENE001@1') is a drug's or a cytokine's: no perturbation of its gene, nor fitted on
    pred = baselines.coexpression(data, max_cells=20)
    assert set(pred.obs["perturbation"]) == knockouts | {"control"}
    assert any(s.startswith("GENE001@1 in") for s in pred.uns["virtualcell"]["skipped"])
    # the same cells named without a dose: predicted cells' typed column says what they are
    plain = data.copy()
    plain.obs["dose"] = 0.0
    assert {"GENE001", "GENE002"} <= set(baselines.coexpression(plain, max_cells=20).obs["perturbation"])
    kinds = {"knockout": "ko", "cytokine": "cytokine", "control": "control"}
    plain.obs["perturbation_typed"] = [p if k == "control" else f"{kinds[k]}:{p}" for p, k in
                                       zip(plain.obs["perturbation"].astype(str), plain.obs["perturbation_type"])]
    assert set(baselines.coexpression(plain, max_cells=20).obs["perturbation"]) == knockouts | {"control"}
    # a knockout's label is its gene's, with a time too; a dose or a typed drug or cytokine is not
    effects = Effects(plain.var_names, {}, {})
    assert effects.genetic("STAT1") and effects.genetic("ko:STAT1") and effects.genetic("TF06@,24h")
    # a kind="label" model types its knockouts plainly ('STAT2'): typed or not, such a label may be a knockout
    assert Effects(plain.var_names, {}, {}, typed={"STAT2": "STAT2"}).genetic("STAT2")
    assert not effects.genetic("IFNG@10") and not effects.genetic("cytokine:IFNG")


def test_cell_eval_export_names_the_dose_column_a_dosed_prediction_needs(cyto):
    real = cyto.copy()
    del real.uns["virtualcell"]  # (its stored contract names the dose column)
    like = vc.evaluate.to_cell_eval(cyto)  # named with doses: 'TF05@1'
    assert "TF05@1" in set(like.obs["target_gene"])
    with pytest.raises(DataError, match=r"name a dose \(e\.g\. .*\) that the measured labels lack.*its obs has "
                                        r"'dose'.*dose_key='dose'"):
        vc.evaluate.to_cell_eval(real, like=like, perturbation_key="perturbation", control="control")
    out = vc.evaluate.to_cell_eval(real, like=like, perturbation_key="perturbation", control="control",
                                   dose_key="dose")
    assert set(out.obs["target_gene"]) == set(like.obs["target_gene"])
    assert np.isfinite(out.X.sum())


def test_evaluate_reads_a_predicted_cytokines_typed_form_for_the_coexpression_baseline(tmp_path):
    """A cytokine named by its gene and trained without a dose ('TF05') was scored by evaluate's coexpression
    baseline as a knockout of TF05: the training cells evaluate hands the baselines now carry the prediction's typed
    forms."""
    import warnings

    from virtualcell.contract import DataContract

    plain = vc.datasets.synthetic_screen(n_genes=40, n_tfs=8, n_knockouts=4, n_pairs=0, n_drugs=0, n_cytokines=3,
                                         n_cells_per_condition=30, n_control_cells=90, n_contexts=1, seed=0)
    del plain.uns["virtualcell"]  # (its stored contract names the dose column)
    plain.obs = plain.obs[["perturbation", "perturbation_type"]].copy()  # knockouts too: the baseline fits on them
    plain.obs["perturbation"] = plain.obs["perturbation"].astype(str).replace(NAMES)
    model = trained_tiny(plain, tmp_path / "m", contract=DataContract("perturbation", "control"))
    ctrl = plain[plain.obs["perturbation"] == "control"]
    pred = vc.Simulator(ctrl[:16].copy(), model).simulate(["TF05"], progress=False).to_anndata()
    assert set(pred.obs["perturbation_typed"]) == {"cytokine:TF05"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the measured file is the training file here: said, and beside the point)
        table = vc.evaluate.evaluate(pred, plain[plain.obs["perturbation"] != "control"].concatenate(ctrl[16:]),
                                     perturbation_key="perturbation", control="control", baseline=ctrl[:16].copy(),
                                     baselines=["coexpression", "pertmean"], ceiling=False, max_cells=20)
    coexpression = set(table["perturbation"][table["method"] == "coexpression"])
    knockouts = set(plain.obs["perturbation"][plain.obs["perturbation_type"] == "knockout"])
    assert coexpression & knockouts and "TF05" not in coexpression, coexpression  # (it scored TF05 as a knockout)
    # held out of the training cells whole: its typed form reaches the baseline all the same
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = vc.evaluate.evaluate(pred, plain[plain.obs["perturbation"] != "control"].concatenate(ctrl[16:]),
                                     perturbation_key="perturbation", control="control", baseline=ctrl[:16].copy(),
                                     train=plain[plain.obs["perturbation"] != "TF05"].copy(),
                                     baselines=["coexpression"], ceiling=False, max_cells=20)
    coexpression = set(table["perturbation"][table["method"] == "coexpression"])
    assert coexpression & knockouts and "TF05" not in coexpression, coexpression


def test_a_panel_line_with_a_pairs_shared_dose_resolves_as_its_string_whatever_its_order():
    """parse sorts a pair's parts and kept the line's one suffix on its part: the panel line 'TNF+IFNG@10' (the
    trained pair at 10) became IFNG at 10 beside TNF at its own trained 20, an untrained pair, without a word."""
    import anndata as ad
    import pandas as pd

    from virtualcell.contract import DataContract
    from virtualcell.perturbations import parse
    from virtualcell.sentences import Vocabulary
    from virtualcell.train import TrainConfig
    from virtualcell.training.labels import typed_labels

    rows = [("control", np.nan, 20), ("IFNG", 10, 10), ("TNF", 20, 10), ("IFNG+TNF", 10, 10)]
    labels = [lab for lab, _, n in rows for _ in range(n)]
    doses = [d for _, d, n in rows for _ in range(n)]
    a = ad.AnnData(np.random.default_rng(0).poisson(1.0, (len(labels), 4)).astype(np.float32),
                   obs=pd.DataFrame({"perturbation": labels, "dose": doses}, index=[str(i) for i in range(len(labels))]),
                   var=pd.DataFrame(index=["STAT1", "IRF1", "IFNG", "TNF"]))
    vocab = typed_labels(a, DataContract(dose_key="dose"), Vocabulary.from_adata(a), TrainConfig(kind="cytokine"))[1]
    for asked in ("IFNG+TNF@10", "TNF+IFNG@10"):
        as_string = str(vocab.resolve(asked))
        assert as_string == "cytokine:IFNG@10 + cytokine:TNF@10"
        assert str(vocab.resolve(parse(asked))) == str(vocab.resolve(parse_panel(asked)[0])) == as_string, asked
    # a part's own dose where no pair was trained at it: as written, the other part at its own trained dose (reading
    # the one suffix as shared gave TNF at 100, a dose it never trained at, without a word)
    assert str(vocab.resolve(parse_panel("IFNG@100+TNF")[0])) == "cytokine:IFNG@100 + cytokine:TNF@20"
