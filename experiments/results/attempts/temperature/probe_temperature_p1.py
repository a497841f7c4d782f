"""Sampling temperature on a protocol-1 checkpoint's own validation split (the verdict's held-out cells only).

    cd experiments && python results/attempts/temperature/probe_temperature_p1.py SEED CELLTYPE CKPT

CKPT: the model ``protocol_1_context_transfer.py --seed SEED --cell-types CELLTYPE --model-dir DIR`` kept
(``DIR/protocol1_CELLTYPE``). The protocol's training data is rebuilt as the protocol builds it, and the
checkpoint judged in memory at temperatures 1, 0.8, 0.6 with 1 and 4 samples per cell.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import _protocol as P  # noqa: E402

import virtualcell as vc  # noqa: E402
from virtualcell.train import rejudge  # noqa: E402

torch.set_num_threads(2)
seed, ct, ckpt = int(sys.argv[1]), sys.argv[2], sys.argv[3]
adata = vc.datasets.load("kang2018_scgen")
contract = vc.DataContract.from_adata(adata)
contexts = contract.contexts(adata)
baseline, reference = P.split(adata, contract, seed=seed)
ref_ctrl = adata.obs_names.isin(reference.obs_names[contract.is_control(reference)])
test = (contexts == ct) & ((contract.labels(adata) == "stimulated") | ref_ctrl)
P.mark_test(adata, test)
model = vc.C2SModel.load(ckpt, device="cpu")
g = model.verdict["settings"].get("guidance", 1.0)
print("chosen", model.verdict["settings"])
cands = tuple({"guidance": g, "temperature": t, "samples": k} for k in (1, 4) for t in (1.0, 0.8, 0.6))
v = rejudge(model, adata, samples=(1,), candidates=cands, temperatures=(1.0,))
for c in v["candidates"]:
    m = c["model"]
    print(c["settings"], round(m["mse"], 5), round(m["pearson_delta"], 3), round(m["pearson_delta_top50"], 3), flush=True)
print("baseline", {k: round(x, 5) for k, x in v["baseline"].items() if isinstance(x, float)})
