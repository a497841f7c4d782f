"""A known-answer perturbation screen simulated from a gene regulatory network.

Real screens never say which interventions truly matter; this one does. A random,
signed regulatory network (a DAG built with :mod:`networkx`) drives every gene:

* **Transcription factors** ``TF01``, ``TF02`` … regulate each other (acyclically) and
  the other genes ``GENE001`` …. A regulator with activity ``a`` contributes
  ``w * a**2 / (K**2 + a**2)`` to the log expression of its target (a Hill function,
  ``w > 0`` activates, ``w < 0`` represses), with ``K`` the regulator's reference level.
  The steady state is computed by propagating the TFs in topological order.
* **Contexts** (``cell_type`` ``typeA``, ``typeB`` …) differ by their baseline TF levels.
* **Knockouts** (``TF03``, ``GENE042``, pairs ``TF03+TF07``) set the gene's expression
  and activity to zero.
* **Drugs** (``drugA`` …) inhibit or activate the activity (not the mRNA) of one or two
  target TFs. The activity is multiplied by ``1 + (max_fold - 1) * dose / (dose + ic50)``:
  inhibitors have ``max_fold = 0`` (fraction inhibited ``dose / (dose + ic50)``),
  activators ``max_fold > 1``.
* **Cytokines** (``CYTO1`` …) induce a receptor-like input program: they raise the
  expression of one to three TFs, given at one saturating level (``dose`` 1).

Cells are sampled around the steady state: every cell gets its own TF noise (which
propagates through the network), a library size, and negative-binomial (gamma-Poisson)
UMI counts. ``adata.X`` holds raw counts.

The ground truth is in ``adata.uns["virtualcell"]["truth"]`` (h5ad-serializable, no
networkx objects): the network, the drug and cytokine targets, and for every condition
its noise-free expected shift on the log1p(counts per 10k) scale in every context, its
effect size (L2 norm of that shift) and the effect-size ranking. :func:`truth_graph`
rebuilds the network, :func:`truth_effects` tabulates the effects.

Examples
--------
>>> import virtualcell as vc
>>> adata = vc.datasets.synthetic_screen(n_cells_per_condition=20, n_control_cells=50, seed=0)
>>> sorted(adata.obs["perturbation_type"].unique())
['control', 'cytokine', 'drug', 'knockout']
>>> truth = adata.uns["virtualcell"]["truth"]
>>> truth["delta"].shape == (len(truth["conditions"]["condition"]), 2, adata.n_vars)
True
>>> graph = vc.datasets.synthetic.truth_graph(adata)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..contract import UNS_KEY, DataContract
from ..errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad
    import networkx as nx
    import pandas as pd

__all__ = ["synthetic_screen", "truth_graph", "truth_effects", "CONTROL"]

CONTROL = "control"
TARGET_SUM = 1e4  # the log1p(counts per 10k) scale of the truth, as in virtualcell.sentences

# Fixed constants of the generative model (documented in the module docstring).
_HILL_N = 2.0  # Hill coefficient of every regulator
_WEIGHT_RANGE = (0.8, 2.5)  # |w| of a regulatory edge, in log units
_P_ACTIVATING = 0.6  # share of activating edges
_MAX_TF_PARENTS = 2  # TF -> TF regulators per TF, at most
_MEAN_TARGET_PARENTS = 1.5  # Poisson mean of the TF regulators of a non-TF gene
_CONTEXT_SD = 0.8  # sd of the per-context shift of the TF log levels
_CELL_TF_SD = 0.2  # sd of the per-cell noise on the TF log levels
_LIBRARY_SD = 0.3  # sd of the log library size
_NB_THETA = 10.0  # negative-binomial inverse dispersion of the counts
_ACTIVATOR_FOLD = (3.0, 8.0)  # max fold activation of an activator drug
_P_INHIBITOR = 0.6  # share of drugs that are inhibitors
_CYTOKINE_LOG_STRENGTH = (1.0, 2.5)  # log fold induction of a cytokine's input TFs
_CYTOKINE_DOSE = 1.0


# --------------------------------------------------------------------------- #
# The network
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class _Network:
    genes: list[str]
    n_tfs: int
    weights: np.ndarray  # (n_tfs, n_genes): regulator TF x target gene, 0 where no edge
    alpha: np.ndarray  # (n_genes,) basal log expression
    half: np.ndarray  # (n_tfs,) reference level K of every TF (its Hill half-activation)
    order: list[int]  # TFs in topological order


def _names(prefix: str, n: int, width: int) -> list[str]:
    width = max(width, len(str(n)))
    return [f"{prefix}{i:0{width}d}" for i in range(1, n + 1)]


def _letters(i: int) -> str:
    """0 -> 'A', 25 -> 'Z', 26 -> 'AA' (spreadsheet columns)."""
    out = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        out = chr(65 + r) + out
    return out


def _build_network(n_genes: int, n_tfs: int, rng: np.random.Generator) -> _Network:
    import networkx as nx

    tfs = _names("TF", n_tfs, 2)
    genes = tfs + _names("GENE", n_genes - n_tfs, 3)
    weights = np.zeros((n_tfs, n_genes))

    def sign(size: int) -> np.ndarray:
        return np.where(rng.random(size) < _P_ACTIVATING, 1.0, -1.0) * rng.uniform(*_WEIGHT_RANGE, size)

    # TF -> TF edges respect a random order, so the TF network is acyclic
    rank = rng.permutation(n_tfs)
    by_rank = np.argsort(rank)
    for pos in range(1, n_tfs):
        k = min(int(rng.integers(0, _MAX_TF_PARENTS + 1)), pos)
        parents = by_rank[rng.choice(pos, size=k, replace=False)]
        weights[parents, by_rank[pos]] = sign(k)
    # TF -> gene edges, with hub TFs: regulators are drawn with heavy-tailed popularity
    popularity = rng.pareto(1.5, n_tfs) + 0.1
    popularity /= popularity.sum()
    n_parents = np.minimum(rng.poisson(_MEAN_TARGET_PARENTS, n_genes - n_tfs), n_tfs)
    for g, k in zip(range(n_tfs, n_genes), n_parents):
        parents = rng.choice(n_tfs, size=int(k), replace=False, p=popularity)
        weights[parents, g] = sign(int(k))

    alpha = np.concatenate([rng.normal(-0.3, 0.7, n_tfs), rng.normal(0.0, 1.0, n_genes - n_tfs)])
    # reference state: every TF at its half-activation level, so each regulator contributes w / 2
    half = np.exp(alpha[:n_tfs] + 0.5 * weights[:, :n_tfs].sum(axis=0))

    graph = nx.DiGraph()
    graph.add_nodes_from(range(n_tfs))
    src, dst = np.nonzero(weights[:, :n_tfs])
    graph.add_edges_from(zip(src.tolist(), dst.tolist()))
    order = list(nx.topological_sort(graph))
    return _Network(genes, n_tfs, weights, alpha, half, order)


def _steady_state(net: _Network, tf_log_input: np.ndarray, activity: np.ndarray, knocked: np.ndarray) -> np.ndarray:
    """Expression levels (rows x genes, linear scale) of many cells or conditions at once.

    ``tf_log_input`` (rows x TFs) is added to the TF log levels (context, cytokine, cell
    noise), ``activity`` (rows x TFs) multiplies the TF activity (drugs), and ``knocked``
    (rows x genes, bool) zeroes a gene's expression and activity.
    """
    n_rows = tf_log_input.shape[0]
    T = net.n_tfs
    alive = ~knocked
    x = np.empty((n_rows, len(net.genes)))
    hill = np.zeros((n_rows, T))
    for t in net.order:  # a TF's regulators are all earlier in this order
        log_level = net.alpha[t] + tf_log_input[:, t] + hill @ net.weights[:, t]
        x[:, t] = np.exp(log_level) * alive[:, t]
        a = (x[:, t] * activity[:, t] / net.half[t]) ** _HILL_N
        hill[:, t] = a / (1.0 + a)
    x[:, T:] = np.exp(net.alpha[T:] + hill @ net.weights[:, T:]) * alive[:, T:]
    return x


def _log1p_cp10k(x: np.ndarray) -> np.ndarray:
    return np.log1p(TARGET_SUM * x / x.sum(axis=1, keepdims=True))


# --------------------------------------------------------------------------- #
# The screen
# --------------------------------------------------------------------------- #
def _check(n_genes: int, n_tfs: int, n_knockouts: int, n_pairs: int | None, n_drugs: int, n_cytokines: int,
           doses: tuple[float, ...], n_cells_per_condition: int, n_control_cells: int, n_contexts: int,
           depth: float) -> None:
    if n_tfs < 1 or n_genes <= n_tfs:
        raise DataError(
            f"Need at least one TF and more genes than TFs, got n_genes={n_genes}, n_tfs={n_tfs}. "
            "Raise n_genes or lower n_tfs (e.g. n_genes=200, n_tfs=20)."
        )
    for name, value in [("n_knockouts", n_knockouts), ("n_pairs", n_pairs or 0), ("n_drugs", n_drugs),
                        ("n_cytokines", n_cytokines)]:
        if value < 0:
            raise DataError(f"{name} must be >= 0, got {value}.")
    for name, value in [("n_cells_per_condition", n_cells_per_condition), ("n_control_cells", n_control_cells),
                        ("n_contexts", n_contexts)]:
        if value < 1:
            raise DataError(f"{name} must be >= 1, got {value}.")
    if n_knockouts > n_genes:
        raise DataError(
            f"n_knockouts={n_knockouts} exceeds the {n_genes} genes; every gene is knocked out at most "
            "once. Raise n_genes, or add drug doses or pairs (n_pairs) for more conditions."
        )
    if n_drugs and (len(doses) == 0 or min(doses) <= 0 or len(set(doses)) != len(doses)):
        raise DataError(
            f"doses must be distinct positive numbers when n_drugs > 0, got {tuple(doses)}. "
            "Pass e.g. doses=(0.1, 1.0, 10.0), or n_drugs=0."
        )
    if not depth > 0:
        raise DataError(f"depth (mean UMIs per cell) must be positive, got {depth}.")


def synthetic_screen(
    *,
    n_genes: int = 200,
    n_tfs: int = 20,
    n_knockouts: int = 20,
    n_pairs: int | None = None,
    n_drugs: int = 10,
    n_cytokines: int = 3,
    doses: tuple[float, ...] = (0.1, 1.0, 10.0),
    n_cells_per_condition: int = 100,
    n_control_cells: int = 500,
    n_contexts: int = 2,
    depth: float = 2000.0,
    seed: int | np.random.Generator = 0,
) -> ad.AnnData:
    """Simulate a perturbation screen whose true effects are known.

    Parameters
    ----------
    n_genes
        Genes in total, the first ``n_tfs`` of them transcription factors (``TF01`` …),
        the rest regulated genes (``GENE001`` …).
    n_tfs
        Transcription factors: the regulators of the network.
    n_knockouts
        Single-gene knockouts: three quarters TFs (as many as there are), the rest other genes.
    n_pairs
        Double knockouts of two TFs that are also knocked out singly (``"TF03+TF07"``);
        by default 5, or as many as the knocked-out TFs allow.
    n_drugs
        Drugs (``drugA`` …), each an inhibitor or activator of one or two TFs, every one
        given at every dose of ``doses``.
    n_cytokines
        Cytokines (``CYTO1`` …), each inducing one to three TFs.
    doses
        The drug doses (distinct, positive; the unit is that of the drugs' IC50).
    n_cells_per_condition
        Cells per condition (perturbation and dose) in every context.
    n_control_cells
        Control cells in every context.
    n_contexts
        Cell types (``typeA``, ``typeB`` …) with different baseline TF levels.
    depth
        Mean UMIs per cell.
    seed
        Seed or :class:`numpy.random.Generator`; the same seed gives the same screen.

    Returns
    -------
    AnnData
        Raw UMI counts (sparse float32), cells grouped by context and condition. ``obs``:
        ``perturbation`` (``"control"``, ``"TF03"``, ``"TF03+TF07"``, ``"drugA"``,
        ``"CYTO1"``), ``perturbation_type`` (control, knockout, drug, cytokine), ``dose``
        (0 for controls and knockouts), ``cell_type`` and ``condition`` (the perturbation,
        with ``@dose`` for drugs: ``"drugA@0.1"``). ``var["is_tf"]`` marks the TFs. The
        data contract is attached; the truth is in ``uns["virtualcell"]["truth"]``:

        ``conditions``
            ``condition``, ``perturbation``, ``perturbation_type``, ``dose`` of every
            non-control condition (arrays, one entry per condition).
        ``contexts``
            The context names, in the order of the ``delta`` axis.
        ``delta``
            float32 (conditions x contexts x genes): the noise-free expected shift from
            control on the log1p(counts per 10k) scale.
        ``effect_size``
            (conditions x contexts): the L2 norm of ``delta`` over genes.
        ``ranking``
            Conditions by mean effect size over contexts, largest first.
        ``baseline``
            (contexts x genes): the noise-free control expression, log1p(counts per 10k).
        ``edges``
            The regulatory network: ``source``, ``target``, ``weight`` (sign: activation
            or repression); :func:`truth_graph` rebuilds it.
        ``drugs``, ``cytokines``
            Their targets: ``drug``, ``target``, ``mode``, ``ic50``, ``max_fold``;
            ``cytokine``, ``target``, ``log_fold``.
        ``tfs``, ``params``
            The TF names and the arguments of this call.

    Notes
    -----
    The effect size counts every gene, the knocked-out gene itself included, so a
    knockout of an unregulating gene still has a clear effect. The response to a drug
    is monotone in the dose for every target; a drug with two targets can still have a
    non-monotone effect size in one context. A cell whose sampled counts are all zero
    (only at a tiny ``depth``) gets one count in its most expressed gene, so that every
    cell can be encoded as a cell sentence.

    Examples
    --------
    >>> import virtualcell as vc
    >>> adata = vc.datasets.load("synthetic", n_cells_per_condition=20, seed=1)
    >>> truth = adata.uns["virtualcell"]["truth"]
    >>> top = truth["ranking"][:5]  # the five interventions with the largest true effect
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    doses = tuple(float(d) for d in doses)
    _check(n_genes, n_tfs, n_knockouts, n_pairs, n_drugs, n_cytokines, doses,
           n_cells_per_condition, n_control_cells, n_contexts, depth)
    rng = np.random.default_rng(seed)
    net = _build_network(n_genes, n_tfs, rng)
    genes, G, T = net.genes, n_genes, n_tfs

    # ---- perturbations: one row per condition, the control first ------------- #
    n_tf_ko = min(T, max(n_knockouts - n_knockouts // 4, n_knockouts - (G - T)))
    ko_tfs = np.sort(rng.choice(T, size=n_tf_ko, replace=False))
    ko_other = np.sort(rng.choice(np.arange(T, G), size=n_knockouts - n_tf_ko, replace=False))
    max_pairs = math.comb(n_tf_ko, 2)
    if n_pairs is None:
        n_pairs = min(5, max_pairs)
    elif n_pairs > max_pairs:
        raise DataError(
            f"n_pairs={n_pairs} exceeds the {max_pairs} pairs of the {n_tf_ko} knocked-out TFs. "
            "Lower n_pairs or raise n_knockouts / n_tfs."
        )
    all_pairs = [(a, b) for i, a in enumerate(ko_tfs) for b in ko_tfs[i + 1:]]
    pairs = [all_pairs[i] for i in np.sort(rng.choice(len(all_pairs), size=n_pairs, replace=False))]

    drug_rows = []  # (drug, target TF index, mode, ic50, max_fold)
    log_lo, log_hi = (np.log10(min(doses)) - 0.5, np.log10(max(doses)) + 0.5) if doses else (0.0, 0.0)
    for d in range(n_drugs):
        inhibitor = rng.random() < _P_INHIBITOR
        for t in rng.choice(T, size=min(T, int(rng.integers(1, 3))), replace=False):
            fold = 0.0 if inhibitor else float(rng.uniform(*_ACTIVATOR_FOLD))
            drug_rows.append((f"drug{_letters(d)}", int(t), "inhibitor" if inhibitor else "activator",
                              float(10 ** rng.uniform(log_lo, log_hi)), fold))
    cyto_rows = []  # (cytokine, target TF index, log fold)
    for c in range(n_cytokines):
        for t in rng.choice(T, size=min(T, int(rng.integers(1, 4))), replace=False):
            cyto_rows.append((f"CYTO{c + 1}", int(t), float(rng.uniform(*_CYTOKINE_LOG_STRENGTH))))

    # (perturbation, type, dose, knocked-out gene indices), the control first
    rows: list[tuple[str, str, float, list[int]]] = [(CONTROL, "control", 0.0, [])]
    rows += [(genes[g], "knockout", 0.0, [int(g)]) for g in [*ko_tfs, *ko_other]]
    rows += [(f"{genes[a]}+{genes[b]}", "knockout", 0.0, [int(a), int(b)]) for a, b in pairs]
    rows += [(name, "drug", dose, []) for name in dict.fromkeys(r[0] for r in drug_rows) for dose in doses]
    rows += [(name, "cytokine", _CYTOKINE_DOSE, []) for name in dict.fromkeys(r[0] for r in cyto_rows)]
    labels = [r[0] for r in rows]
    kinds = [r[1] for r in rows]
    dose_of = [r[2] for r in rows]
    cond_names = [f"{lab}@{dose:g}" if kind == "drug" else lab for lab, kind, dose, _ in rows]
    C = len(labels)

    knocked = np.zeros((C, G), dtype=bool)
    for i, row in enumerate(rows):
        knocked[i, row[3]] = True
    activity = np.ones((C, T))
    tf_input = np.zeros((C, T))
    row_of = {name: i for i, name in enumerate(cond_names)}
    for name, t, _mode, ic50, fold in drug_rows:
        for dose in doses:
            activity[row_of[f"{name}@{dose:g}"], t] *= 1.0 + (fold - 1.0) * dose / (dose + ic50)
    for name, t, log_fold in cyto_rows:
        tf_input[row_of[name], t] += log_fold

    contexts = [f"type{_letters(k)}" for k in range(n_contexts)]
    context_shift = rng.normal(0.0, _CONTEXT_SD, (n_contexts, T))

    # ---- the truth: noise-free steady states, per condition and context --------- #
    cond_idx = np.tile(np.arange(C), n_contexts)
    ctx_idx = np.repeat(np.arange(n_contexts), C)
    x_true = _steady_state(net, tf_input[cond_idx] + context_shift[ctx_idx], activity[cond_idx], knocked[cond_idx])
    level = _log1p_cp10k(x_true).reshape(n_contexts, C, G)
    baseline = level[:, 0, :]
    delta = (level[:, 1:, :] - baseline[:, None, :]).transpose(1, 0, 2)  # conditions x contexts x genes
    effect = np.linalg.norm(delta, axis=2)
    ranking = np.argsort(-effect.mean(axis=1), kind="stable")

    # ---- the cells ---------------------------------------------------------- #
    per_group = np.where(np.arange(C) == 0, n_control_cells, n_cells_per_condition)
    cell_cond = np.tile(np.repeat(np.arange(C), per_group), n_contexts)
    cell_ctx = np.repeat(np.arange(n_contexts), per_group.sum())
    n_cells = cell_cond.size
    noise = rng.normal(0.0, _CELL_TF_SD, (n_cells, T))
    x = _steady_state(net, tf_input[cell_cond] + context_shift[cell_ctx] + noise, activity[cell_cond],
                      knocked[cell_cond])
    library = depth * np.exp(rng.normal(-0.5 * _LIBRARY_SD**2, _LIBRARY_SD, n_cells))
    mean = x * (library / x.sum(axis=1))[:, None]
    counts = rng.poisson(mean * rng.gamma(_NB_THETA, 1.0 / _NB_THETA, mean.shape)).astype(np.float32)
    empty = np.flatnonzero(counts.sum(axis=1) == 0)  # every cell must express a gene (cell sentences)
    counts[empty, np.argmax(mean[empty], axis=1)] = 1.0

    obs = pd.DataFrame(
        {
            "perturbation": pd.Categorical(np.asarray(labels)[cell_cond], categories=list(dict.fromkeys(labels))),
            "perturbation_type": pd.Categorical(np.asarray(kinds)[cell_cond],
                                                categories=["control", "knockout", "drug", "cytokine"]),
            "dose": np.asarray(dose_of, dtype=float)[cell_cond],
            "cell_type": pd.Categorical(np.asarray(contexts)[cell_ctx], categories=contexts),
            "condition": pd.Categorical(np.asarray(cond_names)[cell_cond], categories=cond_names),
        },
        index=pd.Index([f"cell{i:06d}" for i in range(n_cells)]),
    )
    var = pd.DataFrame({"is_tf": np.arange(G) < T}, index=pd.Index(genes))
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)

    src, dst = np.nonzero(net.weights)
    tf_names = np.asarray(genes[:T])
    names = np.asarray(cond_names[1:])
    params = {
        "n_genes": n_genes, "n_tfs": n_tfs, "n_knockouts": n_knockouts, "n_pairs": n_pairs, "n_drugs": n_drugs,
        "n_cytokines": n_cytokines, "doses": np.asarray(doses, dtype=float),
        "n_cells_per_condition": n_cells_per_condition, "n_control_cells": n_control_cells,
        "n_contexts": n_contexts, "depth": float(depth),
        "seed": int(seed) if isinstance(seed, (int, np.integer)) else -1,  # -1: a Generator was passed
    }
    truth: dict[str, Any] = {
        "conditions": {
            "condition": names,
            "perturbation": np.asarray(labels[1:]),
            "perturbation_type": np.asarray(kinds[1:]),
            "dose": np.asarray(dose_of[1:], dtype=float),
        },
        "contexts": np.asarray(contexts),
        "delta": delta.astype(np.float32),
        "effect_size": effect,
        "ranking": names[ranking],
        "baseline": baseline.astype(np.float32),
        "tfs": tf_names,
        "edges": {
            "source": tf_names[src],
            "target": np.asarray(genes)[dst],
            "weight": net.weights[src, dst],
        },
        "drugs": {
            "drug": np.asarray([r[0] for r in drug_rows], dtype=str),
            "target": np.asarray([genes[r[1]] for r in drug_rows], dtype=str),
            "mode": np.asarray([r[2] for r in drug_rows], dtype=str),
            "ic50": np.asarray([r[3] for r in drug_rows], dtype=float),
            "max_fold": np.asarray([r[4] for r in drug_rows], dtype=float),
        },
        "cytokines": {
            "cytokine": np.asarray([r[0] for r in cyto_rows], dtype=str),
            "target": np.asarray([genes[r[1]] for r in cyto_rows], dtype=str),
            "log_fold": np.asarray([r[2] for r in cyto_rows], dtype=float),
        },
        "params": params,
    }
    adata.uns[UNS_KEY] = {
        "dataset": {
            "name": "synthetic",
            "license": "generated data, no license needed",
            "citation": f"virtualcell.datasets.synthetic_screen(seed={params['seed']})",
        },
        "truth": truth,
    }
    # a dose column only where some cells have a dose (drugs, cytokines): named with none, training warns of it
    contract = DataContract("perturbation", CONTROL, context_key="cell_type",
                            dose_key="dose" if n_drugs or n_cytokines else None)
    contract.attach(adata)
    contract.validate(adata)
    return adata


# --------------------------------------------------------------------------- #
# Reading the truth back
# --------------------------------------------------------------------------- #
def _truth(adata: ad.AnnData) -> dict[str, Any]:
    stored = adata.uns.get(UNS_KEY)
    truth = stored.get("truth") if isinstance(stored, dict) else None
    if not truth:
        raise DataError(
            "This AnnData carries no synthetic ground truth (adata.uns['virtualcell']['truth']). "
            "Use the AnnData returned by virtualcell.datasets.synthetic_screen(...) or its .h5ad copy."
        )
    return truth


def truth_graph(adata: ad.AnnData, *, interventions: bool = False) -> nx.DiGraph:
    """The true regulatory network of a synthetic screen as a :class:`networkx.DiGraph`.

    Parameters
    ----------
    adata
        A screen from :func:`synthetic_screen` (or read back from its ``.h5ad``).
    interventions
        Also add the drugs and cytokines as nodes, with edges to their target TFs.

    Returns
    -------
    networkx.DiGraph
        Nodes are genes (attribute ``kind``: ``"tf"`` or ``"gene"``; with
        ``interventions`` also ``"drug"`` and ``"cytokine"``). Regulatory edges carry
        ``weight`` (log units) and ``sign`` (+1 activation, -1 repression); intervention
        edges carry ``kind`` (``"inhibits"``, ``"activates"``, ``"induces"``) and
        ``ic50``/``max_fold`` or ``log_fold``.

    Examples
    --------
    >>> import virtualcell as vc
    >>> adata = vc.datasets.synthetic_screen(n_cells_per_condition=5, n_control_cells=10)
    >>> g = vc.datasets.synthetic.truth_graph(adata)
    >>> all(g.nodes[u]["kind"] == "tf" for u, _ in g.edges)
    True
    """
    import networkx as nx

    truth = _truth(adata)
    tfs = {str(t) for t in truth["tfs"]}
    graph = nx.DiGraph()
    graph.add_nodes_from((str(g), {"kind": "tf" if str(g) in tfs else "gene"}) for g in adata.var_names)
    edges = truth["edges"]
    for s, t, w in zip(edges["source"], edges["target"], edges["weight"]):
        graph.add_edge(str(s), str(t), weight=float(w), sign=1 if w > 0 else -1, kind="regulates")
    if interventions:
        drugs = truth["drugs"]
        for d, t, mode, ic50, fold in zip(drugs["drug"], drugs["target"], drugs["mode"], drugs["ic50"],
                                          drugs["max_fold"]):
            graph.add_node(str(d), kind="drug")
            graph.add_edge(str(d), str(t), kind="inhibits" if mode == "inhibitor" else "activates",
                           ic50=float(ic50), max_fold=float(fold))
        cytos = truth["cytokines"]
        for c, t, lf in zip(cytos["cytokine"], cytos["target"], cytos["log_fold"]):
            graph.add_node(str(c), kind="cytokine")
            graph.add_edge(str(c), str(t), kind="induces", log_fold=float(lf))
    return graph


def truth_effects(adata: ad.AnnData) -> pd.DataFrame:
    """The true effect size of every condition of a synthetic screen, one row each.

    Returns
    -------
    pandas.DataFrame
        Indexed by condition (``"TF03"``, ``"drugA@1"`` …), with ``perturbation``,
        ``perturbation_type``, ``dose``, one ``effect_<context>`` column per context
        (the L2 norm of the true log1p-cp10k shift), ``effect_size`` (their mean) and
        ``rank`` (1 = largest), sorted by rank.

    Examples
    --------
    >>> import virtualcell as vc
    >>> adata = vc.datasets.synthetic_screen(n_cells_per_condition=5, n_control_cells=10)
    >>> table = vc.datasets.synthetic.truth_effects(adata)
    >>> int(table["rank"].iloc[0])
    1
    """
    import pandas as pd

    truth = _truth(adata)
    cond = truth["conditions"]
    effect = np.asarray(truth["effect_size"], dtype=float)
    table = pd.DataFrame(
        {
            "perturbation": np.asarray(cond["perturbation"], dtype=str),
            "perturbation_type": np.asarray(cond["perturbation_type"], dtype=str),
            "dose": np.asarray(cond["dose"], dtype=float),
        },
        index=pd.Index(np.asarray(cond["condition"], dtype=str), name="condition"),
    )
    for k, ctx in enumerate(np.asarray(truth["contexts"], dtype=str)):
        table[f"effect_{ctx}"] = effect[:, k]
    table["effect_size"] = effect.mean(axis=1)
    rank = {str(c): i + 1 for i, c in enumerate(truth["ranking"])}
    table["rank"] = [rank[c] for c in table.index]
    return table.sort_values("rank")
