"""Each split: the gene map its training cells give (both decodes), its error per gene on its own validation fifth
against the plain decode's, and the rank chosen. WHICH: protocols (1, 3, 4; 0: the synthetic screen). Output: gate_check.txt."""
import sys
import _protocol as P
import virtualcell as vc
from codec_ceiling import protocol_runs
from virtualcell.gene_map import GeneMap
from virtualcell.sentences import roundtrip, expression_matrix, log_normalize, detect_scale

def check(name, train, top_k, seed):
    X = expression_matrix(train); T = log_normalize(X, detect_scale(X))
    for m in ("linear", "table"):
        dec = roundtrip(train, top_k=top_k, seed=seed, method=m)
        g = GeneMap.fit(dec.X, T, decode=m, seed=seed)
        inputs = g.inputs.size
        print(f"{name} {m}: error {g.error:.4f} without {g.error_without:.4f} pass={g.error < g.error_without} "
              f"rank {g.rank} inputs {inputs} genes {g.n_genes}", flush=True)

P.setup(1)
import os
for p in os.environ.get("WHICH", "4 3 0 1").split():
    p = int(p)
    if p == 1:
        adata = vc.datasets.load("kang2018_scgen"); contract = vc.DataContract.from_adata(adata)
        contexts = contract.contexts(adata)
        baseline, reference = P.split(adata, contract, seed=0)
        ref_ctrl = adata.obs_names.isin(reference.obs_names[contract.is_control(reference)])
        for ct in sorted(set(contexts)):
            test = (contexts == ct) & ((contract.labels(adata) == "stimulated") | ref_ctrl)
            check(f"P1 {ct}", adata[~test].copy(), 100, 0)
    elif p == 0:
        for seed in (0, 1, 2):
            data = vc.datasets.synthetic_screen(seed=seed)
            _, rest = vc.evaluate.split_controls(data, seed=seed)
            check(f"synthetic s{seed}", rest, 100, seed)
    else:
        for seed in (0, 1, 2):
            run = protocol_runs(p, seed, False)
            check(f"P{p} s{seed}", run["train"], run["top_k"], seed)
