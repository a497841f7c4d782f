"""virtualcell as a guest in its caller's process: the caller's random streams, warning filters, scanpy settings and
pyplot figures are left as they were, two threads may share one loaded model, and a screen's previous results
survive a file another program holds open."""

from __future__ import annotations

import os
import random
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

import virtualcell as vc
from virtualcell.errors import ScreenError


# --------------------------------------------------------------------------- #
# importing pertpy (and scikit-learn) in the caller's process
# --------------------------------------------------------------------------- #
NOISY = '''
import random, warnings
import numpy as np
random.random(); np.random.random_sample(3)  # (rich.style draws from random, jax from numpy.random)
np.random.seed(1234)
warnings.warn("this library is no longer maintained", DeprecationWarning)
warnings.warn("this will change", FutureWarning)
warnings.filterwarnings("ignore", message="its own noise", category=UserWarning)
VALUE = 42
'''


def _noisy_module(tmp_path, monkeypatch, name: str, body: str = NOISY) -> str:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def test_a_dependency_is_imported_without_moving_the_callers_random_streams_or_failing_on_its_noise(tmp_path,
                                                                                                     monkeypatch):
    """pertpy's first import drew from numpy's and random's global generators and raised JAXopt's
    DeprecationWarning, a crash under warnings.simplefilter('error'); the filters a library installs stay."""
    from virtualcell._imports import quiet_import

    name = _noisy_module(tmp_path, monkeypatch, "vc_noisy_dependency")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.random.seed(7)
        random.seed(7)
        assert quiet_import(name).VALUE == 42
        assert np.array_equal(np.random.random_sample(3), np.random.RandomState(7).random_sample(3))
        assert random.random() == random.Random(7).random()
        with pytest.raises(DeprecationWarning):  # only the import's own noise was let through
            warnings.warn("the caller's", DeprecationWarning)
        warnings.warn("its own noise", UserWarning)  # the filter the library installed for itself: still there
        assert quiet_import(name).VALUE == 42  # imported: a plain lookup


def test_pertpy_that_cannot_be_imported_is_a_clear_import_error(tmp_path, monkeypatch):
    from virtualcell._imports import import_pertpy

    with pytest.raises(ImportError, match=r"^distance_test needs pertpy.*pip install pertpy"):
        import_pertpy("distance_test", "vc_no_such_module_here")
    name = _noisy_module(tmp_path, monkeypatch, "vc_warns_on_import",
                         'import warnings\nwarnings.warn("a library it loads", UserWarning)\n')
    with warnings.catch_warnings(), pytest.raises(ImportError, match=r"a UserWarning .* turned into an error"):
        warnings.simplefilter("error")
        import_pertpy("distance_test", name)


def test_every_import_of_pertpy_goes_through_the_one_home(monkeypatch):
    """distance_test, the evaluation's E-distances and the downloading datasets import pertpy (and the screen
    scikit-learn) through virtualcell._imports; no module of the package imports pertpy itself."""
    import virtualcell

    root = Path(virtualcell.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py") if p.name != "_imports.py"
                 and any(line.lstrip().startswith(("import pertpy", "from pertpy"))
                         for line in p.read_text().splitlines())]
    assert not offenders


def test_a_screens_edistance_is_pertpys_to_the_bit_without_importing_pertpy():
    """The screen computes pertpy's E-distance itself (2 x mean cross distance - mean within each, the within means
    over every pair, a cell with itself included; Euclidean, not squared), through the same scikit-learn call:
    a ranking written before resumes to the same bytes, and a screen never imports pertpy (6-10 s)."""
    from virtualcell.generation import blas_threads
    from virtualcell.evaluate.distances import edistance

    rng = np.random.default_rng(0)
    cases = [(rng.normal(size=(n, k)).astype(dtype), (rng.normal(size=(m, k)) + 0.3).astype(dtype))
             for dtype in (np.float32, np.float64) for n, m, k in ((2, 3, 5), (40, 64, 10), (7, 120, 3))]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "pertpy", None)  # (an import of pertpy fails)
        ours = [edistance(a, b) for a, b in cases]
    pt = pytest.importorskip("pertpy")
    theirs = pt.tools.Distance(metric="edistance")
    with blas_threads(1):
        assert ours == [theirs(a, b) for a, b in cases]
        # evaluate's compare_distance, one home with the screen's: pertpy's ratio, in the cells' own precision
        from virtualcell.evaluate.distances import edistance

        assert [edistance(b, a) / edistance(a[:1], a) for a, b in cases] == [
            theirs.compare_distance(pert=b, pred=a, ctrl=a[:1]) for a, b in cases]


def test_a_failed_download_leaves_scanpys_dataset_folder_as_the_caller_set_it(monkeypatch, tmp_path):
    """pertpy downloads into scanpy's datasetdir, which the loader pointed at virtualcell's cache for good."""
    import types

    sc = pytest.importorskip("scanpy")
    from virtualcell import _imports, datasets

    seen = []

    def offline():
        seen.append(Path(sc.settings.datasetdir))
        raise ConnectionError("no network")

    monkeypatch.setenv("VIRTUALCELL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_imports, "import_pertpy", lambda what, name="pertpy": types.SimpleNamespace(norman_2019=offline))
    for before in (tmp_path / "mine", Path("data")):  # set by the caller; scanpy's default (relative: follows the cwd)
        monkeypatch.setattr(sc.settings, "_datasetdir", before)
        with pytest.raises(vc.errors.DataError, match="Could not download 'norman_2019'"):
            datasets.load("norman_2019")
        assert seen[-1] == (tmp_path / "cache" / "pertpy")  # where the download went
        assert sc.settings.datasetdir == before


# --------------------------------------------------------------------------- #
# two threads, one loaded model
# --------------------------------------------------------------------------- #
def _at_once(fns):
    """Run each of ``fns`` in its own thread, started together; their results (an exception where one raised)."""
    out = [None] * len(fns)
    start = threading.Barrier(len(fns))

    def run(i):
        start.wait()
        try:
            out[i] = fns[i]()
        except Exception as err:  # noqa: BLE001
            out[i] = err
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_two_threads_generating_with_one_model_get_what_they_get_one_after_the_other():
    """Shared-prefix attention switches the model's config, which every forward pass reads: two threads read each
    other's switch, both failed, and the model was left switched, so every later call failed too."""
    import torch
    import transformers as tf

    from virtualcell import generation as G

    torch.manual_seed(0)
    model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=64, rotary_pct=0.5,
                                                   max_position_embeddings=128)).eval()
    before = model.config._attn_implementation
    rng = np.random.default_rng(0)
    prefixes = [[rng.integers(3, 50, size=n).tolist() for n in (9, 4, 7, 6)] for _ in range(2)]
    suffixes = [[5], [6, 7], [8, 9, 10]]
    cfg = G.GenerationConfig(max_genes=12, temperature=1.0, batch_size=4, constrain=False, prefix_attention="shared",
                             threads=1)

    def grid(i):
        return sorted(G.generate_grid(model, prefixes[i], suffixes, cell_keys=[0, 1, 2, 3], suffix_keys=[0, 1, 2],
                                      constraint=None, eos_id=2, pad_id=0, config=cfg))

    alone = [grid(0), grid(1)]
    for _ in range(2):
        assert _at_once([lambda: grid(0), lambda: grid(1)]) == alone
    assert model.config._attn_implementation == before


def test_two_threads_simulating_with_one_loaded_model_both_get_the_sequential_results(tiny_model):
    model, _, data = tiny_model
    base = data[data.obs.perturbation == "control"][:8].copy()
    panels = [["STAT1", "ko:JAK2"], ["IRF1", "ko:PSMB9"]]
    sims = [vc.Simulator(base, model), vc.Simulator(base, model)]

    def run(i):
        return sims[i].simulate(panels[i], progress=False, n_cells=8).aggregates["mean"].values

    alone = [run(0), run(1)]
    got = _at_once([lambda: run(0), lambda: run(1)])
    for g, a in zip(got, alone):
        assert not isinstance(g, Exception), g
        assert np.array_equal(g, a)
    assert model.lm.config._attn_implementation != "virtualcell_shared_prefix"
    assert np.array_equal(run(0), alone[0])  # and the model still works


# --------------------------------------------------------------------------- #
# figures, and a screen's folder
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory):
    model, _, data = tiny_model
    sim = vc.Simulator(data[data.obs.perturbation == "control"][:8].copy(), model)
    out = tmp_path_factory.mktemp("citizen") / "screen"
    return sim, sim.screen(["STAT1", "ko:JAK2", "ko:IRF1"], out=out, progress=False, n_boot=5, n_cells=8), out


def test_a_plot_not_returned_stays_current_for_the_callers_savefig(finished, tmp_path):
    """``res.plot_top_hits(); plt.savefig(path)`` saves the plot (closing figures not returned, as review 2 found,
    saved a blank image); a figure returned is the caller's."""
    import matplotlib.pyplot as plt

    from virtualcell import viz

    _, res, _ = finished
    plt.close("all")
    assert res.plot_top_hits() is None
    assert plt.get_fignums() and plt.gcf().axes  # the hits' figure, current
    plt.savefig(tmp_path / "hits.png")
    assert (tmp_path / "hits.png").stat().st_size > 10_000
    assert viz.plot_history([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}], return_fig=True) is not None
    plt.close("all")


def _held_open(monkeypatch, name: str, *, source_too: bool):
    """Windows' answer where another program (Excel) holds ``name`` open: it cannot be removed, renamed or replaced
    (``source_too``: nor moved away; else only replacing it is refused, as when it is opened mid-run)."""
    real = {f: getattr(os, f) for f in ("replace", "rename", "unlink", "remove")}

    def refuse(fn):
        def call(src, *args, **kwargs):
            paths = ([str(src)] if source_too or fn in ("unlink", "remove") else []) + [str(a) for a in args[:1]]
            if any(p.endswith(os.sep + name) for p in paths):
                raise PermissionError(13, "The process cannot access the file because it is being used by another "
                                          "process", str(src))
            return real[fn](src, *args, **kwargs)
        return call

    for fn in real:
        monkeypatch.setattr(os, fn, refuse(fn))


def test_a_screen_run_again_while_excel_holds_its_ranking_keeps_the_previous_results(finished, monkeypatch):
    """The run deleted aggregates.nc, then stopped at ranking.csv: the previous screen no longer loaded."""
    sim, res, out = finished
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    _held_open(monkeypatch, "ranking.csv", source_too=True)
    with pytest.raises(ScreenError, match=r"ranking.csv' cannot be replaced .*open in another program.*close it "
                                          r"there.*previous results are as they were"):
        sim.screen(["STAT1", "ko:JAK2", "ko:IRF1"], out=out, progress=False, n_boot=5, n_cells=8)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert list(vc.screen.load(out).ranking["perturbation"]) == list(res.ranking["perturbation"])
    # opened once the run had started: refused where the new ranking replaces it, saying the run resumes
    _held_open(monkeypatch, "ranking.csv", source_too=False)
    with pytest.raises(ScreenError, match=r"cannot be replaced .*open in another program.*resumes from its saved"):
        sim.screen(["STAT1", "ko:JAK2", "ko:IRF1"], out=out, progress=False, n_boot=5, n_cells=8)
    monkeypatch.undo()
    again = sim.screen(["STAT1", "ko:JAK2", "ko:IRF1"], out=out, progress=False, n_boot=5, n_cells=8)
    assert (out / "ranking.csv").read_bytes() == before["ranking.csv"]
    assert list(again.ranking["perturbation"]) == list(res.ranking["perturbation"])
    assert not list(out.glob(".*.partial*"))


def test_a_rerun_stopped_after_its_config_is_written_never_shows_the_previous_ranking_as_its_own(finished,
                                                                                                monkeypatch):
    """The previous results were put back where panel.txt's write failed after this run's config.json was written:
    load() returned the previous ranking under the new objective (review 2). Put back only while the previous
    config stands; after it, the folder holds no finished screen, and the message does not say 'nothing changed'."""
    sim, res, out = finished
    _held_open(monkeypatch, "panel.txt", source_too=True)
    objective = "lower:" + str(res.aggregates["gene"].values[0])
    with pytest.raises(ScreenError, match=r"panel.txt' cannot be replaced .*settings are written") as err:
        sim.screen(["STAT1", "ko:JAK2", "ko:IRF1"], out=out, progress=False, n_boot=5, n_cells=8, objective=objective)
    assert "nothing was changed" not in str(err.value)
    monkeypatch.undo()
    with pytest.raises(ScreenError, match="holds no finished screen"):
        vc.screen.load(out)
    again = sim.screen(["STAT1", "ko:JAK2", "ko:IRF1"], out=out, progress=False, n_boot=5, n_cells=8,
                       objective=objective)
    assert sorted(again.ranking["perturbation"]) == sorted(res.ranking["perturbation"])


def test_filters_a_library_appends_on_import_stay_behind_the_callers(tmp_path, monkeypatch):
    """urllib3 (under pertpy) appends 'always SecurityWarning' on import: re-added at the front, it overrode a
    caller's simplefilter('ignore') (review 2)."""
    from virtualcell._imports import quiet_import

    (tmp_path / "vc_appending_lib.py").write_text(
        "import warnings\nwarnings.filterwarnings('always', category=UserWarning, append=True)\n"
        "warnings.filterwarnings('error', category=SyntaxWarning)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mine = warnings.filters[0]
        quiet_import("vc_appending_lib")
        assert warnings.filters[1] == mine  # the library's prepended filter first, then the caller's
        assert warnings.filters[0][0] == "error" and warnings.filters[-1][0] == "always"
    sys.modules.pop("vc_appending_lib", None)


def test_virtualcells_own_warnings_have_a_category_a_filter_can_select():
    """Every warning was a plain UserWarning attributed to the caller's line: no filter could tell virtualcell's
    from another library's but by its text. VirtualCellWarning (a UserWarning, so filters on that still apply)."""
    import re

    import anndata as ad
    import pandas as pd

    import virtualcell

    adata = ad.AnnData(np.zeros((3, 2), dtype=np.float32),
                       obs=pd.DataFrame({"perturbation": ["control", " VC_CATEGORY_1 ", "control"]},
                                        index=["a", "b", "c"]))
    with pytest.warns(vc.errors.VirtualCellWarning, match="spaces around them"):
        vc.DataContract("perturbation", "control").labels(adata)
    assert issubclass(vc.errors.VirtualCellWarning, UserWarning)
    root = Path(virtualcell.__file__).parent
    for path in root.rglob("*.py"):
        for call in re.findall(r"warnings\.warn\((?:[^()]|\([^()]*(?:\([^()]*\))*[^()]*\))*\)", path.read_text()):
            if "message" == call[len("warnings.warn("):-1].split(",")[0]:  # (the docstring's example)
                continue
            assert re.search(r"(VirtualCellWarning|DeprecationWarning),\s*stacklevel", call), (path.name, call[:120])
