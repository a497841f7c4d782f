"""The protocols 5 and 1 (CD4T) reruns with the session-40 trainer beside the issue-11 table's runs, per seed.

    python experiments/results/attempts/allocator_steps/compare.py
"""
import json
from pathlib import Path
OLD = Path(__file__).resolve().parents[2] / "issue11"
HERE = Path(__file__).resolve().parent
NEW5 = NEW1 = HERE
for s in (0, 1, 2):
    for name, old, new, ctx in [("P5", OLD / f"seed{s}/protocol_5_cytokine_response.json", NEW5 / f"seed{s}/protocol_5_cytokine_response.json", None),
                                ("P1 CD4T", OLD / f"seed{s}/protocol_1_context_transfer.json", NEW1 / f"seed{s}/protocol_1_context_transfer.json", "CD4T")]:
        if not new.exists():
            continue
        for tag, p in (("before", old), ("after", new)):
            d = json.loads(p.read_text())
            g = [r for r in d["groups"] if ctx is None or r.get("context", ctx) == ctx]
            vals = {}
            for r in g:
                vals.setdefault(r["method"], {})[r["metric"]] = r["value"]
            tr = d["training"] if "runs" not in d else next(
                (r["training"] for r in d["runs"] if ctx in (r.get("cell_type"), r.get("context"))), d["runs"][0]["training"])
            m, b = vals.get("model", {}), vals.get("model (blend)", {})
            keys = ["pearson_delta", "pearson_delta_top50"] + (["edistance"] if "edistance" in m else [])
            print(name, s, tag, f"steps {tr.get('steps')}", "pure", {k: round(m[k], 3) for k in keys}, "served", {k: round(b[k], 3) for k in keys if k in b},
                  "meanshift", {k: round(vals['meanshift'][k], 3) for k in keys})
