"""The C2S transform: encode, vocabulary, rank fit, decode and parsing."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import spearmanr

import virtualcell as vc
from virtualcell.errors import DataError, VocabularyError
from virtualcell.sentences import CellSentences, RankFit, Vocabulary, decode, encode, parse_text


def make(X, genes=None):
    X = np.asarray(X, dtype=np.float32)
    genes = genes or [f"G{i}" for i in range(X.shape[1])]
    return ad.AnnData(X=X, var=pd.DataFrame(index=genes), obs=pd.DataFrame(index=[f"c{i}" for i in range(X.shape[0])]))


def reference_order(row: np.ndarray) -> list[int]:
    """Expressed genes by descending value, ties grouped (order within ties free)."""
    idx = np.flatnonzero(row > 0)
    return sorted(idx, key=lambda j: -row[j])


def test_encode_orders_by_descending_expression_and_drops_zeros():
    a = make([[0, 3, 1, 5, 0], [2, 0, 0, 0, 7]])
    cs = encode(a, top_k=None)
    assert cs.to_text() == ["G3 G1 G2", "G4 G0"]
    assert list(cs.lengths) == [3, 2]


def test_explicit_zeros_are_excluded():
    X = sp.csr_matrix(np.array([[1.0, 2.0, 0.0]], dtype=np.float32))
    X.data = np.array([1.0, 2.0, 0.0], dtype=np.float32)
    X.indices = np.array([0, 1, 2], dtype=np.int32)
    X.indptr = np.array([0, 3])
    assert X.nnz == 3  # an explicitly stored zero
    a = ad.AnnData(X=X, var=pd.DataFrame(index=["A", "B", "C"]))
    assert encode(a).to_text() == ["B A"]


def test_top_k_and_short_cells():
    rng = np.random.default_rng(1)
    X = rng.poisson(2.0, size=(50, 40)).astype(np.float32)
    X[0, :] = 0
    X[0, :3] = [5, 4, 3]
    cs = encode(make(X), top_k=10)
    assert cs.lengths[0] == 3
    assert (cs.lengths[1:] <= 10).all()


def test_ties_are_seeded_and_reproducible():
    X = np.ones((20, 30), dtype=np.float32)
    a = make(X)
    s0 = encode(a, seed=0).ids
    assert np.array_equal(s0, encode(a, seed=0).ids)
    assert not np.array_equal(s0, encode(a, seed=1).ids)
    # ties are broken per cell, not by one global gene order
    first = encode(a, seed=0)
    assert len({tuple(first[i][:5]) for i in range(20)}) > 1
    # the tie-break does not depend on chunking or threads
    assert np.array_equal(s0, encode(a, seed=0, threads=1).ids)


def test_sparse_dense_and_layer_agree(papalexi_small):
    dense = papalexi_small.copy()
    dense.X = papalexi_small.X.toarray()
    dense.layers["counts"] = papalexi_small.X.copy()
    a = encode(papalexi_small, seed=3)
    assert np.array_equal(a.ids, encode(dense, seed=3).ids)
    assert np.array_equal(a.ids, encode(dense, layer="counts", seed=3).ids)


def test_encode_matches_brute_force_on_real_data(papalexi_small):
    cs = encode(papalexi_small, top_k=50, seed=0)
    X = papalexi_small.X.toarray()
    for i in range(0, 2000, 97):
        ids = cs[i]
        vals = X[i, ids]
        assert np.all(np.diff(vals) <= 0), "not descending"
        expected = reference_order(X[i])
        k = len(ids)
        # the same multiset of values within the top-k, and every unkept value is <= the last kept
        assert np.allclose(np.sort(vals), np.sort(X[i, expected[:k]]))
        rest = np.setdiff1d(np.flatnonzero(X[i] > 0), ids)
        assert rest.size == 0 or X[i, rest].max() <= vals[-1]


def test_round_trip_on_real_data_keeps_order(kang_harmony):
    """Encode -> decode -> encode reproduces each cell's gene order within the top-k."""
    cs = encode(kang_harmony, top_k=200, seed=0)
    fit = RankFit.fit(kang_harmony, cs)
    X = decode(cs, fit, method="linear")
    # decoded values fall strictly with rank, so re-encoding gives back the same order
    back = ad.AnnData(X=X, var=pd.DataFrame(index=list(cs.vocab.genes)))
    cs2 = encode(back, top_k=200, seed=0)
    assert np.array_equal(cs.offsets, cs2.offsets)
    assert np.array_equal(cs.ids, cs2.ids)
    # and the decoded expression tracks the truth over the kept genes
    Xn = vc.sentences.log_normalize(vc.sentences.expression_matrix(kang_harmony), "counts")
    rows = np.repeat(np.arange(len(cs)), cs.lengths)
    truth = np.asarray(Xn[rows, cs.ids]).ravel()
    rho = spearmanr(truth, np.asarray(X[rows, cs.ids]).ravel()).statistic
    assert rho > 0.8
    assert 0.5 < fit.r2 <= 1.0 and fit.slope < 0


def test_rank_fit_round_trips_through_dict(papalexi_small):
    cs = encode(papalexi_small)
    fit = RankFit.fit(papalexi_small, cs)
    again = RankFit.from_dict(fit.to_dict())
    assert again == fit
    assert fit.normalization == "log1p_cp10k"
    t = fit.expression(np.arange(5), method="table")
    assert np.all(np.diff(t) <= 1e-6)


def test_save_load_and_subset(tmp_path, papalexi_small):
    cs = encode(papalexi_small, top_k=20)
    cs.save(tmp_path / "s.npz")
    back = CellSentences.load(tmp_path / "s.npz")
    assert np.array_equal(back.ids, cs.ids) and back.vocab == cs.vocab
    sub = cs.subset([5, 2])
    assert np.array_equal(sub[0], cs[5]) and np.array_equal(sub[1], cs[2])


# ----------------------------------------------------------------------------- parsing
def test_parse_drops_unknown_words_without_shifting_ranks():
    vocab = Vocabulary.from_names(["A", "B", "C", "D"])
    cs, report = parse_text(["a XYZ b b, c.", "d"], vocab)
    assert cs.genes(0) == ["A", "B", "C"]
    assert list(cs.rank_array()[:3]) == [0, 2, 4]  # positions, not compacted
    assert report.n_invalid == 1 and report.n_duplicate == 1 and report.n_words == 6
    assert report.invalid_fraction == pytest.approx(1 / 6)
    assert cs.genes(1) == ["D"]


def test_parse_then_decode_places_repeated_gene_once():
    vocab = Vocabulary.from_names(["A", "B"])
    cs, _ = parse_text(["A A B"], vocab)
    fit = RankFit(-1.0, 3.0, 1.0, "as_is_log1p", 1)
    X = decode(cs, fit).toarray()
    assert X[0, 0] == pytest.approx(3.0) and X[0, 1] == pytest.approx(3.0 - np.log10(3.0))


def test_rank_fit_decodes_by_its_own_method_and_keeps_it():
    """``decode`` uses the fit's ``method`` unless told otherwise; the checkpoint's dict keeps it, and a dict
    written before the field existed decodes as it did (linear)."""
    vocab = Vocabulary.from_names(["A", "B", "C"])
    cs, _ = parse_text(["C A B"], vocab)
    linear = RankFit(-1.0, 3.0, 1.0, "as_is_log1p", 1, rank_means=(5.0, 4.0, 0.5))
    table = RankFit.from_dict(linear.to_dict() | {"method": "table"})
    assert table.method == "table" and RankFit.from_dict(table.to_dict()) == table
    np.testing.assert_allclose(decode(cs, table).toarray(), [[4.0, 0.5, 5.0]])
    np.testing.assert_allclose(decode(cs, table, method="linear").toarray(), decode(cs, linear).toarray())
    old = {k: v for k, v in linear.to_dict().items() if k != "method"}
    assert RankFit.from_dict(old).method == "linear"
    with pytest.raises(DataError, match="Unknown decode method 'spline'"):
        RankFit(-1.0, 3.0, 1.0, "as_is_log1p", 1, method="spline")
    with pytest.raises(DataError, match="rank table"):
        RankFit(-1.0, 3.0, 1.0, "as_is_log1p", 1, method="table")


# ----------------------------------------------------------------------------- bad input
def test_duplicate_gene_names_after_uppercase_are_named():
    with pytest.raises(VocabularyError, match=r"Tp53 / TP53 -> TP53"):
        Vocabulary.from_names(["Tp53", "TP53", "MYC"])


def test_exact_duplicate_gene_names():
    a = make([[1, 2]], genes=["X", "Y"])
    a.var_names = ["X", "X"]
    with pytest.raises(VocabularyError, match="var_names_make_unique"):
        encode(a)


def test_ensembl_ids_are_gene_names_and_gene_key_picks_symbols():
    """A gene-level model reads ids as they are; gene_key (var_key: deprecated alias) picks a symbol column;
    a text model refuses ids and names the CLI flag."""
    from virtualcell.sentences import Vocabulary, require_symbols

    a = make([[1, 2, 3]], genes=["ENSG00000141510.17", "ENSG00000136997.21", "ENSG00000111640.15"])
    a.var["symbol"] = ["TP53", "MYC", "GAPDH"]
    assert encode(a).to_text() == ["ENSG00000111640.15 ENSG00000136997.21 ENSG00000141510.17"]
    assert encode(a, gene_key="symbol").to_text() == ["GAPDH MYC TP53"]
    with pytest.warns(DeprecationWarning, match="gene_key"):
        assert encode(a, var_key="symbol").to_text() == ["GAPDH MYC TP53"]
    with pytest.raises(VocabularyError, match=r"Ensembl ids.*--gene-key COLUMN"):
        require_symbols(a.var_names)
    with pytest.raises(VocabularyError, match=r"no such var column.*'symbol'"):
        encode(a, gene_key="symbols")
    # another annotation release (version suffix) or another case is the same gene
    vocab = Vocabulary.from_adata(a)
    assert list(vocab.ids(["ENSG00000141510.18", "ENSG00000136997", "ensg00000111640.15"])) == [0, 1, 2]
    mouse = Vocabulary.from_names(["Stat1", "Irf1"])
    assert list(mouse.ids(["STAT1", "Irf1", "Foo"], missing="mark")) == [0, 1, -1]


def test_gene_key_refuses_empty_and_duplicated_names():
    a = make([[1, 2, 3]], genes=["ENSG00000141510", "ENSG00000136997", "ENSG00000111640"])
    a.var["symbol"] = ["TP53", "MYC", "MYC"]
    with pytest.raises(VocabularyError, match=r"more than once.*'MYC'"):
        encode(a, gene_key="symbol")
    a.var["symbol"] = ["TP53", None, "GAPDH"]
    with pytest.raises(VocabularyError, match=r"1 of 3 genes have no name"):
        encode(a, gene_key="symbol")


@pytest.mark.parametrize(
    ("value", "match"), [(-1.0, "negative"), (np.nan, "NaN"), (np.inf, "infinite")]
)
def test_bad_values_are_refused(value, match):
    X = np.ones((3, 3), dtype=np.float32)
    X[1, 2] = value
    with pytest.raises(DataError, match=match):
        encode(make(X))
    with pytest.raises(DataError, match=match):
        encode(ad.AnnData(X=sp.csr_matrix(X)))


def test_cells_without_expressed_genes_are_named():
    X = np.ones((3, 3), dtype=np.float32)
    X[1] = 0
    with pytest.raises(DataError, match=r"1 of 3 cells have no expressed genes \(e.g. 'c1'\)"):
        encode(make(X))
    # on the genes shared with a vocabulary, the cell that expresses only others is named so, with a filter over
    # the shared genes (the filter over all genes removed nothing, and the same refusal came back)
    X = np.array([[1, 2, 0], [0, 0, 5], [3, 0, 1]], dtype=np.float32)
    vocab = Vocabulary.from_names(["G0", "G1"])
    with pytest.raises(DataError, match=r"1 of 3 cells express none of the 2 genes shared.*missing='mark'"):
        encode(make(X), vocab=vocab, genes="shared")
    shared = vocab.ids(["G0", "G1", "G2"], missing="mark") >= 0  # the filter the message gives keeps the others
    kept = make(X)[np.asarray((make(X)[:, shared].X > 0).sum(axis=1)).ravel() > 0]
    assert list(kept.obs_names) == ["c0", "c2"] and len(encode(kept, vocab=vocab, genes="shared")) == 2


def test_empty_anndata():
    with pytest.raises(DataError, match="empty"):
        encode(make(np.zeros((0, 3))))


def test_missing_layer():
    with pytest.raises(DataError, match="Layer 'counts' is not in the AnnData"):
        encode(make([[1.0]]), layer="counts")


def test_encoding_into_a_model_vocabulary_reports_overlap():
    vocab = Vocabulary.from_names(["A", "B", "C"])
    a = make([[1, 2, 3]], genes=["A", "B", "Z"])
    with pytest.raises(VocabularyError, match=r"1 of the data's 3 genes.*2 shared.*genes='shared'"):
        encode(a, vocab=vocab)
    cs = encode(a, vocab=vocab, genes="shared")
    assert cs.to_text() == ["B A"] and cs.vocab is vocab


def test_expression_matrix_leaves_the_callers_unsorted_matrix_alone():
    import scipy.sparse as sp

    from virtualcell.sentences import expression_matrix

    # a float64 CSR whose column indices are unsorted within rows (as some stored files are)
    X = sp.csr_matrix((np.array([1.0, 2.0, 3.0]), np.array([2, 0, 1]), np.array([0, 2, 3])), shape=(2, 3))
    assert not X.has_sorted_indices
    a = ad.AnnData(X=X)
    before = a.X.toarray().copy()
    out = expression_matrix(a)
    np.testing.assert_array_equal(a.X.toarray(), before)  # the caller's data is unchanged
    np.testing.assert_array_equal(out.toarray(), before.astype(np.float32))
    assert out.has_sorted_indices


def test_roundtrip_is_the_decoded_sentence_of_every_cell(papalexi_small):
    """Each cell comes back with its sentence's genes at the rank fit's value of their rank, every other gene 0."""
    from virtualcell.sentences import roundtrip

    a = papalexi_small[:50].copy()
    sentences = encode(a, top_k=20, seed=0)
    fit = RankFit.fit(a, sentences, seed=0)
    back = roundtrip(a, sentences, fit)
    assert back.shape == a.shape and (back.obs_names == a.obs_names).all() and (back.var_names == a.var_names).all()
    X = back.X.toarray()
    for i in (0, 17, 49):
        ids = sentences[i]
        np.testing.assert_allclose(X[i, ids], fit.expression(np.arange(ids.size)), rtol=1e-6)
        rest = np.setdiff1d(np.arange(a.n_vars), ids)
        assert not X[i, rest].any()
    with pytest.raises(DataError, match="sentences for"):
        roundtrip(a[:10], sentences, fit)


def test_values_that_are_neither_counts_nor_log_scale_are_refused():
    """Normalized but not logged (or corrected counts): read as log1p they would put every prediction on the
    wrong scale, so they stop with what to do."""
    from virtualcell.sentences import detect_scale

    counts = sp.random(40, 30, density=0.3, format="csr", random_state=0, data_rvs=lambda n: np.arange(1, n + 1))
    assert detect_scale(counts) == "counts"
    cp10k = counts.multiply(1e4 / counts.sum(axis=1)).tocsr()
    assert detect_scale(cp10k.log1p()) == "log1p"
    with pytest.raises(DataError, match=r"not whole numbers.*reach [0-9.e+]+.*sc\.pp\.log1p.*np\.rint"):
        detect_scale(cp10k)
    with pytest.raises(DataError, match="not whole numbers"):
        detect_scale((counts * 0.93).toarray())  # ambient-corrected counts, dense


def test_a_matrix_of_counts_and_log_values_concatenated_is_refused_in_either_order():
    """The scale was read from the first 2M stored values: log1p rows first read every count row as log1p (values
    up to hundreds, unnormalized), counts first normalized the log rows a second time."""
    import scipy.sparse as sp

    from virtualcell.errors import DataError
    from virtualcell.sentences import detect_scale

    rng = np.random.default_rng(0)
    counts = sp.random(3000, 400, density=0.3, format="csr", random_state=1, data_rvs=lambda k: rng.integers(1, 50, k))
    logged = counts.copy()
    logged.data = np.log1p(logged.data * 10.0).astype(np.float32)
    assert detect_scale(counts) == "counts" and detect_scale(logged) == "log1p"
    interleaved = sp.vstack([counts[:1500], logged[1500:]]).tocsr()[rng.permutation(3000)]  # concatenated, sorted
    small = counts[:100].copy()
    small.data = np.minimum(small.data, 20)  # counts below the log scale's reach: no value looks out of place
    for mixed in (sp.vstack([logged, counts]).tocsr(), sp.vstack([counts, logged]).tocsr(),
                  sp.vstack([logged[:100], counts[:100]]).tocsr(),  # a small one too (one window covered it all)
                  interleaved, interleaved.toarray(), sp.vstack([logged[:100], small]).tocsr()[rng.permutation(200)]):
        with pytest.raises(DataError, match="mixes scales"):  # (interleaved: 'not logged', so users logged twice)
            detect_scale(mixed)
    # counts with two values of x.5 in one cell are no concatenation of files: that cell is named, to be rounded
    odd = counts[:24].toarray()
    odd[5, np.flatnonzero(odd[5])[:2]] += 0.5
    with pytest.raises(DataError, match=r"1 of 24 cells checked hold values that are not whole numbers \(e\.g\. rows 5;"
                                        r".*among cells of raw counts.*np\.rint"):
        detect_scale(odd)
    # log1p values stored as float16: a near-empty cell of one gene can read whole (log1p(2981) is 8.0); not a mix
    f16 = logged[:200].toarray()
    f16[:5] = 0
    f16[np.arange(5), np.arange(5)] = 8.0
    assert detect_scale(f16.astype(np.float16)) == "log1p"
    # log2(1 + counts) keeps counts 1, 3, 7 whole: it passed as counts with odd values, and rounding ruined it
    log2 = counts.copy()
    log2.data = np.log2(1 + log2.data).astype(np.float32)
    with pytest.raises(DataError, match=r"look like log2\(1 \+ counts\).*np\.exp2"):
        detect_scale(log2)


def test_counts_go_onto_the_total_of_a_model_trained_on_log1p_values(papalexi_small, caplog):
    """A model trained on scanpy's layout (log1p of the median library) read raw counts normalized to 1e4 per cell,
    several times its scale, without a word; predictions recorded another normalization and evaluate normalized
    measured counts to 1e4 against them. The rank fit records its training cells' total; counts go onto it, in the
    Simulator and in evaluate (the prediction records it: uns scale_total)."""
    from virtualcell.evaluate._data import prediction_total, prepare
    from virtualcell.sentences import on_model_scale

    counts = papalexi_small[:300].copy()
    X = counts.X.toarray().astype(np.float64)
    logged = counts.copy()
    logged.X = sp.csr_matrix(np.log1p(X / X.sum(1, keepdims=True) * 700.0).astype(np.float32))
    vocab = Vocabulary.from_adata(logged)
    fit = RankFit.fit(logged, encode(logged, vocab=vocab, top_k=30))
    assert fit.normalization == "as_is_log1p" and fit.total == pytest.approx(700.0, rel=1e-4)
    assert RankFit.from_dict(fit.to_dict()) == fit
    old = RankFit.from_dict({k: v for k, v in fit.to_dict().items() if k != "total"})
    assert old.total is None and "total" not in old.to_dict()  # an earlier checkpoint's record (and digest) as it was
    onto, scale, norm = on_model_scale(counts, vocab, fit=fit)
    assert scale == "counts" and norm == "as_is_log1p"
    np.testing.assert_allclose(onto.toarray(), logged.X.toarray(), atol=1e-4)
    with caplog.at_level("WARNING"):
        on_model_scale(counts, vocab, fit=old)
    assert "without recording their total" in caplog.text
    # log1p values at its own total, or at 1e4 per cell (14-fold off: within 25), pass without a word (cell lines of
    # other depths are); at 1e6 per cell a warning names both totals
    caplog.clear()
    for total in (700.0, 1e4):
        other = counts.copy()
        other.X = sp.csr_matrix(np.log1p(X / X.sum(1, keepdims=True) * total).astype(np.float32))
        with caplog.at_level("WARNING"):
            on_model_scale(other, vocab, fit=fit)
    assert "normalized to a median of" not in caplog.text
    far = counts.copy()
    far.X = sp.csr_matrix(np.log1p(X / X.sum(1, keepdims=True) * 1e6).astype(np.float32))
    with caplog.at_level("WARNING"):
        on_model_scale(far, vocab, fit=fit)
    assert "normalized to a median of 1e+06" in caplog.text and "to 700" in caplog.text
    pred = logged[:10].copy()
    pred.uns["virtualcell"] = {"normalization": "as_is_log1p", "scale_total": 700.0}
    assert prediction_total(pred) == 700.0
    contract = vc.DataContract.from_adata(counts)
    prepared = prepare(counts, contract, pd.Index(counts.var_names), name="measured", total=prediction_total(pred))
    np.testing.assert_allclose(prepared.X.toarray(), logged.X.toarray(), atol=1e-4)


def test_real_lab_files_odd_labels_read_one_way(papalexi_small, tmp_path):
    """A backed file failed differently at each entry point (anndata's and numpy's errors); half the controls written
    'control ' were dropped by predict and measured as a perturbation by split_controls; a control given as the number
    0 of integer labels was not found; gene names with spaces around them were 'none of the model's genes'."""
    import warnings

    from virtualcell.errors import DataError, VocabularyError

    path = tmp_path / "a.h5ad"
    papalexi_small[:50].copy().write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    for call in (lambda: vc.evaluate.split_controls(backed), lambda: vc.evaluate.to_cell_eval(backed),
                 lambda: vc.train.train(backed, out=tmp_path / "m")):
        with pytest.raises(DataError, match=r"on disk.*to_memory\(\)"):
            call()
    backed.file.close()
    a = papalexi_small.copy()
    ctrl = np.flatnonzero(a.obs["perturbation"] == "control")
    a.obs["perturbation"] = a.obs["perturbation"].astype(str)
    a.obs.iloc[ctrl[::2], a.obs.columns.get_loc("perturbation")] = "control "
    contract = vc.DataContract("perturbation", "control")
    with pytest.warns(UserWarning, match="spaces around"):
        assert contract.is_control(a).sum() == ctrl.size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, real = vc.evaluate.split_controls(a, perturbation_key="perturbation", control="control")
    assert "control " not in set(contract.labels(real)) and base.n_obs + int(contract.is_control(real).sum()) == ctrl.size
    assert vc.DataContract("n", 0).control == "0"
    spaced = a[:20].copy()
    spaced.var_names = [f"{g} " for g in spaced.var_names]
    with pytest.raises(VocabularyError, match="spaces around them"):
        encode(spaced, vocab=Vocabulary.from_adata(a), top_k=10)


def test_a_missing_context_is_refused_wherever_contexts_are_read(papalexi_small):
    """train and evaluate refused a context column with missing values; the Simulator read them as a context named
    'nan'. contexts() refuses them, one rule for every reader."""
    from virtualcell.errors import ContractError

    a = papalexi_small[:10].copy()
    a.obs["cell_type"] = pd.array(["A", None] * 5, dtype="string")
    with pytest.raises(ContractError, match="context column 'cell_type' has 5 missing values"):
        vc.DataContract("perturbation", "control", context_key="cell_type").contexts(a)


def test_sentence_text_refuses_gene_names_holding_its_separator():
    """A gene 'GENE Y' written into a sentence's text reads back as two genes: the text form refuses it, naming the
    compact form that keeps it."""
    import anndata as ad
    import pandas as pd

    from virtualcell.errors import VocabularyError

    a = ad.AnnData(np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]], dtype=np.float32),
                   var=pd.DataFrame(index=["GENE Y", "STAT1", "JAK2"]))
    cs = vc.encode(a)
    with pytest.raises(VocabularyError, match=r"1 gene names hold ' ' \('GENE Y'\).*\.npz"):
        cs.to_text()
    assert cs.to_text(sep=",")[0] == "GENE Y,STAT1"
