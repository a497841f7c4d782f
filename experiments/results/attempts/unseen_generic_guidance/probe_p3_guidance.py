"""Probe (session 25): protocol 3's held-out knockouts from one trained model at several guidance scales.

    python experiments/protocol_3_unseen_knockouts.py --seed S --threads 1 --model-dir M --out O
    python experiments/results/attempts/unseen_generic_guidance/probe_p3_guidance.py S M/protocol3 0,0.5,1

Guidance 0 is the model's generic knockout (its own "mean perturbation"); 1 is the unseen target read
through its gene's token, as the protocol asks it. Pure model, scored as the protocol scores it
(pearson_delta and discrimination over the 4 held-out knockouts), beside pertmean.
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # experiments/
import _protocol as P  # noqa: E402
from protocol_3_unseen_knockouts import data  # noqa: E402

import virtualcell as vc  # noqa: E402

seed, mdir = int(sys.argv[1]), sys.argv[2]
P.setup(1)
adata, contract, held, candidates, train_ad, baseline, reference = data(seed, 4)
model = vc.C2SModel.load(mdir)
out = {}
for g in [float(x) for x in sys.argv[3].split(",")]:
    pred, _, _ = P.predict(model, baseline, {p: f"ko:{p}" for p in held}, perturbation_key=contract.perturbation_key,
                           n_cells=200, seed=seed, guidance=g, blend=False)
    table = P.score(pred, reference, baseline=baseline, train=train_ad, contract=contract,
                    focus=[(p, "all") for p in held], baselines=("pertmean",), seed=seed, cell_eval=False)
    s = table.groupby(["method", "metric"])["value"].mean()
    out[g] = {m: round(float(s[("model", m)]), 3) for m in ("pearson_delta", "discrimination")}
    out["pertmean"] = {m: round(float(s[("pertmean", m)]), 3) for m in ("pearson_delta", "discrimination")}
    print(g, out[g], out["pertmean"], flush=True)
(HERE / f"probe_p3_s{seed}.json").write_text(json.dumps(out, indent=1))
