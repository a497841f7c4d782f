"""How training reads a cytokine screen with the default kind 'auto'.

Cytokines are often named by their genes (IFNG, TNF, IL6) or like genes (Kang's 'IFNB'), given at doses in ng/ml or
U/ml, and beside controls called 'unstim' or 'PBS'. Kind auto reads such labels as knockouts; training says so, with
the fixes (--kind cytokine, --kind-key), rather than serve a cytokine's effect for every knockout without a word.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

import virtualcell as vc
from virtualcell.contract import DataContract
from virtualcell.errors import DataError
from virtualcell.perturbations import dose_on_one_scale, looks_like_control
from virtualcell.sentences import Vocabulary
from virtualcell.train import TrainConfig
from virtualcell.training.labels import typed_labels

GENES = ("IFNG", "TNF", "STAT1", "G1", "G2", "G3")


def _cells(labels, *, dose=None, kind=None, own=None, genes=GENES, extra=None):
    """Counts for cells with these labels (and doses, a column of kinds, other obs columns), and the contract that
    reads them: every gene at 5 counts, and the gene each label names at ``own`` where it is given (0 for a
    knockout that silences its target, 60 for a cytokine that induces its own gene)."""
    import anndata as ad

    obs = pd.DataFrame({"perturbation": labels}, index=[f"c{i}" for i in range(len(labels))])
    for name, values in (("dose", dose), ("kind", kind), *(extra or {}).items()):
        if values is not None:
            obs[name] = values
    X = np.full((len(labels), len(genes)), 5.0, dtype=np.float32)
    if own is not None:
        for i, label in enumerate(labels):
            if label in genes:
                X[i, genes.index(label)] = own
    a = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=list(genes)))
    return a, DataContract("perturbation", "control", dose_key="dose" if dose is not None else None)


def _read(a, contract, caplog, **cfg):
    """The typed form of each label, and the warnings training said reading them."""
    with caplog.at_level(logging.WARNING, logger="virtualcell"):
        caplog.clear()
        typed, _ = typed_labels(a, contract, Vocabulary.from_adata(a), TrainConfig(**cfg))
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return dict(zip(contract.labels(a), typed)), said


SCREEN = ["control"] * 6 + ["IFNG"] * 4 + ["TNF"] * 4


def test_cytokines_named_by_their_genes_that_raise_them_are_said_to_be_no_knockouts(caplog):
    a, contract = _cells(SCREEN, own=60.0)
    typed, said = _read(a, contract, caplog)
    assert typed["IFNG"] == "ko:IFNG"  # (read as before: a warning, no change of behaviour)
    rise = [m for m in said if "raise that gene's own expression" in m]
    assert len(rise) == 1 and "IFNG +" in rise[0] and "--kind cytokine" in rise[0] and "--kind activation" in rise[0]
    assert "--kind-key" in rise[0]
    # knockouts that silence their targets (or leave them) say nothing
    for own in (0.0, 5.0):
        a, contract = _cells(SCREEN, own=own)
        assert not [m for m in _read(a, contract, caplog)[1] if "own expression" in m]
    # nor does one of several knockouts that happens to rise
    labels = ["control"] * 6 + ["IFNG"] * 4 + ["TNF"] * 4 + ["STAT1"] * 4
    a, contract = _cells(labels, own=0.0)
    a.X[np.asarray(a.obs["perturbation"] == "IFNG"), 0] = 60.0
    assert not [m for m in _read(a, contract, caplog)[1] if "own expression" in m]


def test_knockouts_of_no_gene_of_the_panel_are_said_at_warning(caplog):
    # Kang's interferon as shipped: 'IFNB' alone, no gene of the panel
    a, contract = _cells(["control"] * 6 + ["IFNB"] * 4)
    typed, said = _read(a, contract, caplog)
    assert typed["IFNB"] == "ko:IFNB"
    hit = [m for m in said if "gene of the panel: a knockout screen" in m]
    assert len(hit) == 1 and "'IFNB'" in hit[0] and "--kind cytokine" in hit[0] and "--kind-key" in hit[0]
    # a knockout screen that measures one of its targets says nothing; nor does --kind knockout, said outright
    a, contract = _cells(["control"] * 6 + ["IFNB"] * 4 + ["STAT1"] * 4)
    assert not [m for m in _read(a, contract, caplog)[1] if "gene of the panel" in m]
    a, contract = _cells(["control"] * 6 + ["IFNB"] * 4)
    assert not [m for m in _read(a, contract, caplog, kind="knockout")[1] if "gene of the panel" in m]


@pytest.mark.parametrize("unit", ["ng/ml", "U/ml", "ug/ml", "IU/ml"])
def test_genetic_labels_dosed_in_mass_or_activity_say_the_dose_is_dropped(caplog, unit):
    a, contract = _cells(SCREEN, dose=[""] * 6 + [f"10{unit}"] * 8)
    typed, said = _read(a, contract, caplog)
    assert typed["IFNG"] == "ko:IFNG"
    hit = [m for m in said if "takes no dose" in m]
    assert len(hit) == 1 and "IFNG" in hit[0] and "--kind cytokine" in hit[0]
    # read as cytokines, each keeps its dose and nothing is said
    typed, said = _read(a, contract, caplog, kind="cytokine")
    assert typed["IFNG"] == f"cytokine:IFNG@10{unit}" and not [m for m in said if "takes no dose" in m]


def test_genetic_labels_at_plain_doses_say_nothing_of_them(caplog):
    # perturbench's knockouts and activations carry dose '1' and '1+1': plain numbers, no unit of an agent
    a, contract = _cells(["control"] * 6 + ["STAT1"] * 4 + ["G1+G2"] * 4, dose=[""] * 6 + ["1"] * 4 + ["1+1"] * 4,
                         own=0.0)
    typed, said = _read(a, contract, caplog)
    assert typed["STAT1"] == "ko:STAT1"
    assert not [m for m in said if "takes no dose" in m or "own expression" in m or "gene of the panel" in m]


def test_a_genetic_label_at_several_doses_names_the_kinds_of_agents(caplog):
    a, contract = _cells(["control"] * 6 + ["IFNG"] * 8, dose=[""] * 6 + ["10ng/ml"] * 4 + ["100ng/ml"] * 4)
    with pytest.raises(DataError, match="more than one dose") as err:
        typed_labels(a, contract, Vocabulary.from_adata(a), TrainConfig())
    assert "--kind cytokine" in str(err.value) and "--context-key" in str(err.value)
    typed, _ = typed_labels(a, contract, Vocabulary.from_adata(a), TrainConfig(kind="cytokine"))
    assert set(typed) == {"control", "cytokine:IFNG@10ng/ml", "cytokine:IFNG@100ng/ml"}  # each dose its own


def test_a_column_of_kinds_that_kind_auto_leaves_unread_is_named(caplog):
    kinds = ["control"] * 6 + ["Cytokine"] * 8
    a, contract = _cells(SCREEN, extra={"perturbation_type": kinds, "donor": ["d1", "d2"] * 7})
    _, said = _read(a, contract, caplog)
    hit = [m for m in said if "which kind auto does not read" in m]
    assert len(hit) == 1 and "obs['perturbation_type']" in hit[0] and "--kind-key perturbation_type" in hit[0]
    typed, said = _read(a, contract, caplog, kind_key="perturbation_type")  # given, it is read and nothing is said
    assert typed["IFNG"] == "cytokine:IFNG" and not [m for m in said if "kind auto" in m]
    assert not [m for m in _read(a, contract, caplog, kind="cytokine")[1] if "kind auto" in m]
    # a column of other words (a donor, a plate) is none
    a, contract = _cells(SCREEN, extra={"donor": ["d1", "d2"] * 7})
    assert not [m for m in _read(a, contract, caplog)[1] if "kind auto does not read" in m]
    # a column that says what kind auto reads anyway (a drug screen's 'drug', a knockout screen's 'CRISPR') is none
    for name, screen in (("drug", vc.datasets.synthetic_screen(n_genes=40, n_tfs=8, n_knockouts=0, n_drugs=2,
                                                                n_cytokines=0, n_contexts=1, n_cells_per_condition=20,
                                                                n_control_cells=60)),
                         ("knockout", vc.datasets.synthetic_screen(n_genes=40, n_tfs=8, n_knockouts=4, n_drugs=0,
                                                                    n_cytokines=0, n_contexts=1,
                                                                    n_cells_per_condition=20, n_control_cells=60))):
        assert set(screen.obs["perturbation_type"]) == {"control", name}
        said = _read(screen, DataContract.from_adata(screen), caplog)[1]
        assert not [m for m in said if "kind auto does not read" in m], said
    # a pair's kinds per part agree in any order, a control part aside ('CRISPR+drug' for 'STAT1+drugA')
    a, contract = _cells(["control", "STAT1", "drugA", "STAT1+drugA", "KLF1+ctrl"], dose=["", "", "1", "1", ""],
                         extra={"perturbation_type": ["control", "CRISPR", "drug", "CRISPR+drug", "CRISPR+control"]},
                         genes=("G1", "STAT1", "KLF1"))
    assert not [m for m in _read(a, contract, caplog)[1] if "kind auto does not read" in m]


@pytest.mark.parametrize("label", ["unstim", "unstimulated", "PBS", "medium", "resting", "vehicle", "untreated",
                                   "Unstim_2"])
def test_the_controls_of_a_stimulation_look_like_controls(caplog, label):
    assert looks_like_control(label)
    a, contract = _cells(["control"] * 6 + [label] * 4 + ["IFNG"] * 4)
    _, said = _read(a, contract, caplog, kind="cytokine")
    assert [m for m in said if "look like control labels" in m and label in m]


@pytest.mark.parametrize("unit", ["IU/ml", "units/ml", "U/mL", "IU/mL"])
def test_international_units_are_units_per_ml(caplog, unit):
    assert dose_on_one_scale(unit) == ("U/ml", 1.0)
    # one agent's doses in U/ml and IU/ml read as one unit, not refused as two that do not convert
    a, contract = _cells(["control"] * 6 + ["IFNB"] * 8, dose=[""] * 6 + ["100U/ml"] * 4 + [f"1000{unit}"] * 4)
    typed, _ = _read(a, contract, caplog, kind="cytokine")
    conditions = set(contract.conditions(a)) - {"control"}
    assert conditions == {"IFNB@100", "IFNB@1000"}
    assert contract.dose_units(a) == {"IFNB": "U/ml"}
