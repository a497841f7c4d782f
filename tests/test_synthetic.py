"""The known-answer synthetic screen: reproducible, recoverable, serializable."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.stats as st

import virtualcell as vc
from virtualcell.contract import DataContract
from virtualcell.datasets.synthetic import truth_effects, truth_graph
from virtualcell.errors import DataError
from virtualcell.sentences import log_normalize


@pytest.fixture(scope="module")
def screen():
    return vc.datasets.synthetic_screen(seed=0)


def _log_expression(adata) -> np.ndarray:
    return log_normalize(adata.X.tocsr(), "counts").toarray()


def _measured_effects(adata) -> np.ndarray:
    """Conditions x contexts: L2 norm of the shift of the mean log1p-cp10k expression from control."""
    truth = adata.uns["virtualcell"]["truth"]
    L = _log_expression(adata)
    cond = adata.obs["condition"].astype(str).to_numpy()
    ctx = adata.obs["cell_type"].astype(str).to_numpy()
    out = np.zeros(np.shape(truth["effect_size"]))
    for k, c in enumerate(truth["contexts"]):
        base = L[(cond == "control") & (ctx == c)].mean(axis=0)
        for i, name in enumerate(truth["conditions"]["condition"]):
            out[i, k] = np.linalg.norm(L[(cond == name) & (ctx == c)].mean(axis=0) - base)
    return out


def test_layout_contract_and_names(screen):
    obs = screen.obs
    assert screen.n_vars == 200 and screen.var["is_tf"].sum() == 20
    assert all(g.isupper() and not g.startswith("ENS") for g in screen.var_names)
    assert screen.var_names.is_unique
    assert set(obs["perturbation_type"]) == {"control", "knockout", "drug", "cytokine"}
    assert (obs.loc[obs["perturbation_type"].isin(["control", "knockout"]), "dose"] == 0).all()
    assert set(obs.loc[obs["perturbation_type"] == "drug", "dose"]) == {0.1, 1.0, 10.0}
    assert any("+" in p for p in obs["perturbation"].astype(str))
    assert (obs["perturbation"] == "control").sum() == 2 * 500
    contract = DataContract.from_adata(screen)
    assert contract == DataContract("perturbation", "control", context_key="cell_type", dose_key="dose")
    contract.validate(screen)
    X = screen.X
    assert np.array_equal(X.data, np.round(X.data)), "raw counts are whole numbers"
    assert (np.asarray(X.sum(axis=1)).ravel() > 0).all()


def test_same_seed_same_screen_other_seed_differs(screen):
    again = vc.datasets.synthetic_screen(seed=0)
    assert (screen.X != again.X).nnz == 0
    assert screen.obs.equals(again.obs)
    np.testing.assert_array_equal(screen.uns["virtualcell"]["truth"]["delta"], again.uns["virtualcell"]["truth"]["delta"])
    other = vc.datasets.synthetic_screen(seed=1)
    assert (screen.X != other.X).nnz > 0
    assert not np.array_equal(screen.uns["virtualcell"]["truth"]["delta"], other.uns["virtualcell"]["truth"]["delta"])


def test_true_top_interventions_are_recoverable_from_the_data(screen):
    truth = screen.uns["virtualcell"]["truth"]
    measured = _measured_effects(screen)
    rho = st.spearmanr(measured.mean(axis=1), np.asarray(truth["effect_size"]).mean(axis=1))[0]
    assert rho > 0.8
    names = np.asarray(truth["conditions"]["condition"])
    top_measured = set(names[np.argsort(-measured.mean(axis=1))[:10]])
    assert len(top_measured & set(truth["ranking"][:10])) >= 7
    table = truth_effects(screen)
    assert list(table.index) == list(truth["ranking"]) and table["rank"].iloc[0] == 1


def test_knockout_silences_its_gene(screen):
    obs = screen.obs
    singles = [p for p in obs.loc[obs["perturbation_type"] == "knockout", "perturbation"].astype(str).unique()
               if "+" not in p]
    assert len(singles) == 20
    tfs = [g for g in singles if screen.var.loc[g, "is_tf"]]
    others = [g for g in singles if not screen.var.loc[g, "is_tf"]]
    assert tfs and others
    labels = obs["perturbation"].astype(str)
    control = (labels == "control").to_numpy()
    mean = dict(zip(screen.var_names, np.asarray(screen[control].X.mean(axis=0)).ravel()))
    for gene in (max(tfs, key=mean.get), max(others, key=mean.get)):
        knocked = labels.str.split("+").apply(lambda parts, g=gene: g in parts).to_numpy()
        counts = screen[:, gene].X.toarray().ravel()
        assert counts[control].mean() > 1.0
        assert counts[knocked].mean() < 0.05 * counts[control].mean()


def test_drug_dose_response_is_monotone(screen):
    truth = screen.uns["virtualcell"]["truth"]
    drugs = truth["drugs"]
    single = [d for d in np.unique(drugs["drug"]) if (drugs["drug"] == d).sum() == 1]
    assert single
    table = truth_effects(screen)
    effect_cols = [c for c in table.columns if c.startswith("effect_")]
    for drug in single:  # in truth: every context, every single-target drug
        rows = table[table["perturbation"] == drug].sort_values("dose")
        assert (np.diff(rows[effect_cols].to_numpy(), axis=0) >= 0).all(), drug
    # in the data: the strongest single-target drug's most responsive gene moves one way with dose
    drug = max(single, key=lambda d: table.loc[table["perturbation"] == d, "effect_size"].max())
    names = list(truth["conditions"]["condition"])
    delta = np.asarray(truth["delta"])[names.index(f"{drug}@10"), 0]
    gene = int(np.argmax(np.abs(delta)))
    L = _log_expression(screen)[:, gene]
    obs = screen.obs
    in_ctx = (obs["cell_type"] == truth["contexts"][0]).to_numpy()
    means = [L[in_ctx & (obs["perturbation"] == "control").to_numpy()].mean()]
    for dose in (0.1, 1.0, 10.0):
        means.append(L[in_ctx & (obs["condition"] == f"{drug}@{dose:g}").to_numpy()].mean())
    steps = np.diff(means) * np.sign(delta[gene])
    assert (steps > -0.05).all() and steps.sum() > 0.5


def test_truth_graph_and_h5ad_round_trip(screen, tmp_path):
    graph = truth_graph(screen)
    truth = screen.uns["virtualcell"]["truth"]
    assert graph.number_of_edges() == len(truth["edges"]["source"]) > 0
    assert set(graph.nodes) == set(screen.var_names)
    import networkx as nx

    tf_graph = graph.subgraph([g for g, kind in graph.nodes(data="kind") if kind == "tf"])
    assert nx.is_directed_acyclic_graph(tf_graph)
    full = truth_graph(screen, interventions=True)
    assert {"drugA", "CYTO1"} <= set(full.nodes)

    path = tmp_path / "synthetic.h5ad"
    screen.write_h5ad(path)
    back = vc.datasets.read_h5ad(path)
    assert back.shape == screen.shape
    assert truth_effects(back).equals(truth_effects(screen))
    assert nx.utils.graphs_equal(truth_graph(back, interventions=True), full)
    np.testing.assert_array_equal(back.uns["virtualcell"]["truth"]["delta"], truth["delta"])


def test_cells_encode_as_sentences(screen):
    """Each synthetic cell becomes a sentence of its most expressed genes, highest first."""
    cells = screen[:3000]
    cs = vc.encode(cells, top_k=50)
    texts = cs.to_text()
    assert len(texts) == cells.n_obs
    X = cells.X.toarray()
    genes = np.asarray(cells.var_names)
    for i in range(0, cells.n_obs, 300):
        words = texts[i].split()
        expressed = int((X[i] > 0).sum())
        assert len(words) == min(50, expressed)
        values = X[i, [list(genes).index(w) for w in words]]
        assert np.all(np.diff(values) <= 0)  # in rank order
        assert values[-1] >= np.sort(X[i])[::-1][len(words) - 1]  # and no stronger gene left out


def test_load_synthetic_and_scale():
    small = vc.datasets.load("synthetic", seed=1, n_cells_per_condition=10, n_control_cells=20)
    assert small.uns["virtualcell"]["truth"]["params"]["seed"] == 1
    big = vc.datasets.synthetic_screen(n_knockouts=150, n_pairs=0, n_drugs=50, n_cells_per_condition=50,
                                       n_control_cells=100, n_contexts=1, seed=2)
    assert big.obs["condition"].nunique() == 1 + 150 + 50 * 3 + 3
    assert big.n_obs == 100 + 303 * 50
    generator = vc.datasets.synthetic_screen(n_cells_per_condition=5, n_control_cells=5,
                                             seed=np.random.default_rng(3))
    assert generator.uns["virtualcell"]["truth"]["params"]["seed"] == -1
    # a screen with no dosed agent names no dose column (training warned the user of a column they never named)
    plain = vc.datasets.synthetic_screen(n_drugs=0, n_cytokines=0, n_cells_per_condition=5, n_control_cells=5)
    assert vc.DataContract.from_adata(plain).dose_key is None
    assert vc.DataContract.from_adata(generator).dose_key == "dose"


def test_impossible_settings_say_what_to_change():
    with pytest.raises(DataError, match="exceeds the 30 genes.*Raise n_genes"):
        vc.datasets.synthetic_screen(n_genes=30, n_tfs=5, n_knockouts=40)
    with pytest.raises(DataError, match="doses must be distinct positive"):
        vc.datasets.synthetic_screen(doses=(0.0, 1.0))
    with pytest.raises(DataError, match="more genes than TFs"):
        vc.datasets.synthetic_screen(n_genes=10, n_tfs=10)
    with pytest.raises(DataError, match="n_pairs=50 exceeds"):
        vc.datasets.synthetic_screen(n_knockouts=4, n_pairs=50)
    with pytest.raises(DataError, match="no synthetic ground truth"):
        truth_graph(ad.AnnData(np.ones((2, 3), dtype=np.float32)))
