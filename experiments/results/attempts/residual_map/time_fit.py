"""Seconds per gene-map fit on protocol 1's panel (Kang 2018, 4,000 training cells, 100-gene sentences) at 1
thread: each kind fitted alone (GeneMap.fit), and both together (GeneMap.fit_kinds, one SVD of the inputs).

    cd experiments && PYTHONPATH=. python results/attempts/residual_map/time_fit.py   # -> time_fit.txt beside it
"""
import time
from pathlib import Path

import _protocol as P

P.setup(1)
import virtualcell as vc  # noqa: E402
from virtualcell.gene_map import GeneMap  # noqa: E402
from virtualcell.sentences import detect_scale, expression_matrix, log_normalize, roundtrip  # noqa: E402

adata = vc.datasets.load("kang2018_scgen")
train = adata[adata.obs.index[:4000]].copy()
X = expression_matrix(train)
T = log_normalize(X, detect_scale(X))
dec = roundtrip(train, top_k=100, seed=0, method="linear")
lines = []
for residual in (False, True):
    t = time.perf_counter()
    g = GeneMap.fit(dec.X, T, decode="linear", seed=0, residual=residual)
    lines.append(f"fit residual={residual}: {time.perf_counter() - t:.1f} s, {g.record()}")
t = time.perf_counter()
GeneMap.fit_kinds(dec.X, T, decode="linear", seed=0)
lines.append(f"fit_kinds (both): {time.perf_counter() - t:.1f} s")
(Path(__file__).parent / "time_fit.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
