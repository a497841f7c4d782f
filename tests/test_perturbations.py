"""Typed perturbations and their text syntax."""

from __future__ import annotations

import pytest

from virtualcell.errors import PerturbationError
from virtualcell.perturbations import Combination, Perturbation, in_units, parse, parse_panel


@pytest.mark.parametrize(
    ("text", "kind", "target"),
    [("ko:stat1", "knockout", "STAT1"), ("knockdown:MYC", "knockdown", "MYC"), ("crispra:KLF1", "activation", "KLF1"),
     ("drug:dexamethasone", "drug", "dexamethasone"), ("cytokine:IFNB@100ng/ml", "cytokine", "IFNB"),
     ("STAT1", "label", "STAT1"), ("control", "control", "")],
)
def test_parse_kinds(text, kind, target):
    p = parse(text)
    assert (p.kind, p.target) == (kind, target)


def test_drug_dose_and_time():
    p = parse("drug:dexamethasone@10uM,24h")
    assert (p.dose, p.dose_unit, p.time, p.time_unit, p.time_hours) == (10.0, "uM", 24.0, "h", 24.0)
    assert str(p) == "drug:dexamethasone@10uM,24h"
    assert parse(str(p)) == p
    assert p.describe() == "dexamethasone at 10 uM for 24 h"
    assert parse("drug:x@1uM,30min").time_hours == pytest.approx(0.5)


def test_combinations_are_canonical():
    a = parse("ko:STAT1 + drug:ruxolitinib@1uM")
    b = parse("drug:ruxolitinib@1uM+ko:stat1")
    assert isinstance(a, Combination) and a == b
    assert str(a) == "drug:ruxolitinib@1uM + ko:STAT1"
    assert parse("KLF1+MAP2K6").parts == (Perturbation("label", "KLF1"), Perturbation("label", "MAP2K6"))
    assert parse("control + ko:A") == Perturbation("knockout", "A")


@pytest.mark.parametrize(
    ("text", "match"),
    [("ko:STAT1@1uM", "takes no dose"), ("virus:X", "Unknown perturbation type"), ("drug:x@ten", "Cannot read the dose"),
     ("drug:x@1uM,3weeks", "unknown time unit"), ("ko:", "needs a target"),
     ("ko:A + ko:A", "repeats a part"), ("ko:A +", "stray"), ("drug:x@-3uM", "is negative: write a positive dose"),
     ("", "An empty perturbation")],
)
def test_bad_perturbations(text, match):
    with pytest.raises(PerturbationError, match=match):
        parse(text)


def test_a_label_is_read_as_the_data_names_it_spaces_and_all(tiny_model):
    """A panel line 'Givinostat (ITF2357)@1' (sci-Plex's names) was refused before the model was asked ('a plain label
    has no spaces'); a label of several words the model does not know ('STAT1 KO') is refused by the model, with
    the typed form of a gene's knockout."""
    from virtualcell.perturbations import Perturbation, parse_panel

    assert parse_panel("Givinostat (ITF2357)@1\n") == [Perturbation("label", "Givinostat (ITF2357)@1")]
    model, _, _ = tiny_model
    with pytest.raises(PerturbationError, match=r"does not know the perturbation 'STAT1 KO'.*'ko:STAT1'"):
        model.resolve(["STAT1 KO"])
    with pytest.raises(PerturbationError) as err:  # two words that are no gene and an edit: no knockout offered
        model.resolve(["TNF alpha"])
    assert "ko:TNF" not in str(err.value)
    # a '+' inside brackets is the name's; one after a bracket nobody closes joins two parts, as it always did
    from virtualcell.perturbations import split_label

    assert split_label("(+)-JQ1+ko:STAT1") == ["(+)-JQ1", "ko:STAT1"]
    assert split_label("drug:a (b@1uM+ko:STAT1") == ["drug:a (b@1uM", "ko:STAT1"]
    import anndata as ad
    import numpy as np
    import pandas as pd

    from virtualcell.contract import DataContract

    cells = ad.AnnData(np.ones((4, 2), np.float32), var=pd.DataFrame(index=["G1", "G2"]),
                       obs=pd.DataFrame({"perturbation": ["control", "(+)-JQ1", "(+)-JQ1", "drugB"],
                                         "dose": ["", "1uM", "10uM", "5ng/ml"]}, index=list("abcd")))
    units = DataContract("perturbation", "control", dose_key="dose").dose_units(cells)
    assert units == {"(+)-JQ1": "uM", "drugB": "ng/ml"}  # the compound's own unit, not '(' and ')-JQ1''s


def test_panel_names_the_bad_line():
    with pytest.raises(PerturbationError, match="panel line 3: Unknown perturbation type"):
        parse_panel("ko:STAT1\n# comment\nbogus:X\n")
    with pytest.raises(PerturbationError, match="line 2: 'ko:A' repeats line 1"):
        parse_panel("ko:A\nko:a\n")
    with pytest.raises(PerturbationError, match="empty"):
        parse_panel("# nothing\n\n")
    assert [str(p) for p in parse_panel("ko:A  # first\n\nSTAT1\n")] == ["ko:A", "STAT1"]


def test_a_panel_line_with_a_group_writes_one_perturbation_a_choice():
    panel = parse_panel("drug:DEX@{0.1, 1,10}uM,24h  # a titration\nko:{STAT1,JAK2} + drug:RUX@1uM\n")
    assert [str(p) for p in panel] == ["drug:DEX@0.1uM,24h", "drug:DEX@1uM,24h", "drug:DEX@10uM,24h",
                                       "drug:RUX@1uM + ko:STAT1", "drug:RUX@1uM + ko:JAK2"]
    with pytest.raises(PerturbationError, match=r"panel line 2: .*has a '\{' that no '\}' closes"):
        parse_panel("ko:STAT1\ndrug:DEX@{0.1,1uM\n")
    with pytest.raises(PerturbationError, match=r"panel line 1: .*has a '\}' that no '\{' opens"):
        parse_panel("ko:STAT1}\n")
    with pytest.raises(PerturbationError, match=r"panel line 1: .*one \{\.\.\.\} group a line"):
        parse_panel("drug:{A,B}@{1,10}uM\n")
    with pytest.raises(PerturbationError, match=r"panel line 1: .*empty choice"):
        parse_panel("drug:DEX@{0.1,,10}uM\n")
    with pytest.raises(PerturbationError, match=r"panel line 2: 'drug:DEX@1uM' repeats line 1"):
        parse_panel("drug:DEX@1uM\ndrug:DEX@{1,10}uM\n")
    with pytest.raises(PerturbationError, match=r"panel line 1: .*'ko:A' repeats line 1"):
        parse_panel("ko:{A,a}\n")


def test_the_command_line_list_keeps_times_and_groups_whole():
    from virtualcell.cli import _split_list

    assert _split_list("A,B+C, drug:X@1uM,24h") == ["A", "B+C", "drug:X@1uM,24h"]
    assert _split_list("drugA@1,5FU,drugB@1,30min") == ["drugA@1", "5FU", "drugB@1,30min"]  # 5FU is no time
    # a dosed, timed part before another part of its combination (it was cut at the time: '24h + ko:STAT1')
    assert _split_list("drug:X@1uM,24h + ko:STAT1,JAK2") == ["drug:X@1uM,24h + ko:STAT1", "JAK2"]
    # a pair of timed drugs, as predict names it: the second part's time is its own (it was cut off as '24h')
    assert _split_list("drug:(+)-JQ1@10,24h + drug:Dexamethasone@10,24h") == [
        "drug:(+)-JQ1@10,24h + drug:Dexamethasone@10,24h"]
    assert _split_list("drug:X@{0.1,1}uM,24h,ko:{STAT1,JAK2}") == [
        "drug:X@0.1uM,24h", "drug:X@1uM,24h", "ko:STAT1", "ko:JAK2"]
    with pytest.raises(PerturbationError, match=r"that no '\}' closes"):
        _split_list("drug:X@{0.1,1uM")


def test_micro_is_read_from_the_micro_sign_and_the_greek_mu():
    """Word, Excel and macOS write either character for micro; both read as u (they look the same on screen)."""
    from virtualcell.perturbations import read_quantity

    assert read_quantity("1 \u00b5M") == (1.0, "\u00b5M") and read_quantity("10 \u03bcM") == (10.0, "\u03bcM")
    a, b = parse("drug:x@10\u00b5M"), parse("drug:x@10\u03bcM")
    assert a.dose == b.dose == 10.0 and str(in_units(b, {"x": "uM"})) == str(in_units(a, {"x": "uM"}))


def test_a_label_trained_as_two_kinds_names_neither_alone_and_a_pair_reads_in_any_order():
    """A gene activated in one cell line and knocked down in others (obs[kind_key] differs by context): each kind is
    its own perturbation; the bare label is refused naming both, each typed form is named by the label in
    predictions, and a trained pair written in the other order is that pair (not its parts' commonest kinds)."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    from virtualcell.contract import DataContract
    from virtualcell.prompts import PerturbationVocab
    from virtualcell.sentences import Vocabulary
    from virtualcell.train import TrainConfig, typed_labels

    rows = [("control", "control", "k562"), ("MAP2K3", "CRISPRa", "k562"), ("KLF1+MAP2K6", "CRISPRa", "k562"),
            ("KLF1", "CRISPRa", "k562"), ("control", "control", "u87"), ("MAP2K3", "CRISPRi", "u87"),
            ("MAP2K3", "CRISPRi", "u87"), ("MAP2K6", "CRISPRi", "u87")]
    obs = pd.DataFrame(rows, columns=["perturbation", "kind", "cell_line"], index=[f"c{i}" for i in range(len(rows))])
    adata = ad.AnnData(np.ones((len(rows), 3), dtype=np.float32), obs=obs,
                       var=pd.DataFrame(index=["MAP2K3", "MAP2K6", "KLF1"]))
    typed, vocab = typed_labels(adata, DataContract("perturbation", "control", context_key="cell_line"),
                                Vocabulary.from_adata(adata), TrainConfig(kind_key="kind"), warn=False)
    assert typed[1] == "act:MAP2K3" and typed[5] == "kd:MAP2K3"
    assert vocab.forms == {"MAP2K3": ["act:MAP2K3", "kd:MAP2K3"]}
    for asked in ("MAP2K3", "MAP2K3+KLF1"):
        with pytest.raises(PerturbationError, match="trained as 2 perturbations, act:MAP2K3 and kd:MAP2K3"):
            vocab.resolve(asked)
    assert str(vocab.resolve("act:MAP2K3")) == "act:MAP2K3"
    assert vocab.labels_for([parse("act:MAP2K3"), parse("kd:MAP2K3")]) == ["MAP2K3", "MAP2K3"]
    assert vocab.resolve("MAP2K6+KLF1") == vocab.resolve("KLF1+MAP2K6") == parse("act:KLF1+act:MAP2K6")
    assert PerturbationVocab.from_dict(vocab.to_dict()).forms == vocab.forms


def test_a_large_or_tiny_dose_writes_and_reads_back_and_a_zero_dose_is_refused():
    """str() never writes an exponent ('1e+06' would split as a combination), parse reads one typed by hand, and a
    dose of 0 (no drug at all) is refused rather than read as a dose bin."""
    for text in ("cytokine:C@1000000ng/ml,6h", "drug:x@0.000000001uM", "drug:x@25000000nM + ko:STAT1"):
        assert str(parse(str(parse(text)))) == str(parse(text)) and "e+" not in str(parse(text)) \
            and "e-" not in str(parse(text))
    assert parse("drug:x@1e+3nM") == parse("drug:x@1000nM")
    assert parse("drug:x@1e+3nM + ko:PPP1R3E") == parse("drug:x@1000nM + ko:PPP1R3E")
    assert str(parse("PPP1R3E+STAT1")) == "PPP1R3E + STAT1"  # a gene ending in digit + E still splits
    with pytest.raises(PerturbationError, match="a dose of 0 is no drug"):
        parse("drug:x@0uM,24h")


def test_a_combination_perturbing_one_gene_twice_is_refused():
    with pytest.raises(PerturbationError, match="perturbs STAT1 twice"):
        parse("ko:STAT1 + kd:STAT1")


def test_two_spellings_of_one_dose_name_one_condition():
    """evaluate matched 'drugA@1.0' (a prediction's label) to no measured 'drugA@1' group, and scored 2 of 6."""
    from virtualcell.perturbations import canonical_condition

    assert canonical_condition("drugA@1.0") == "drugA@1" and canonical_condition("drugA@0.10,24.0h") == "drugA@0.1,24h"
    for kept in ("drugA@1uM", "A+B@1+1", "x@high", "STAT1", "drugA@,24h"):
        assert canonical_condition(kept) == kept


def test_a_time_in_capital_m_is_refused_as_molar_not_read_as_minutes():
    """'@100,5M' read 5 minutes (the time units were matched in lower case, and 'm' is a minute); M is molar."""
    from virtualcell.perturbations import hours_per

    with pytest.raises(PerturbationError, match="unknown time unit 'M'"):
        parse("drug:drugA@100,5M")
    assert parse("drug:drugA@100,5m").time_hours == pytest.approx(5 / 60) and hours_per("M") is None


def test_the_control_cells_kind_is_not_read():
    """--kind-key: control cells with an empty kind stopped training as an unknown kind 'nan' (a dose column's
    control values are not read either)."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    from virtualcell.errors import DataError
    from virtualcell.perturbations import read_kinds

    cells = ad.AnnData(obs=pd.DataFrame({"kind": [None, "CRISPRa", "knockdown"]}, index=list("abc")))
    assert read_kinds(cells, "kind", controls=np.array([True, False, False])) == ["control", "activation", "knockdown"]
    with pytest.raises(DataError, match=r"Unknown perturbation kinds \['none'\]"):
        read_kinds(cells, "kind")
