"""A fingerprint of short, fully pinned trainings: does a change to the trainer change what it trains?

    python experiments/trainer_fingerprint.py --out fp.json [--compare other.json]

Three 40-step runs on the embedded screen (rep_3 held out, ``top_k`` 50, 1 thread, ``eager`` attention, float32,
no compiling: nothing left to a timing), each with another set of options: the defaults; response weights + PCA
gene embeddings + 2 pair draws + own-token dropout + neighbour offsets; no extras (no token bias, no target offsets,
no repeat mask) + keep-best. For each: a hash of the trained weights, the loss history and the validation verdict
(timings left out). A refactor that keeps the training the same keeps all three to the bit. ``--compare`` reports
which runs differ from another fingerprint (e.g. made by the previous commit in a ``git worktree``).

Session 48 (``experiments/results/trainer_fingerprint.md``): the trainer split into parts (80ce25b) against the
commit before it (0f7d5bb), both on this 2-core AVX2 machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tempfile
import time
from pathlib import Path

RUNS = {
    "default": {},
    "weighted_pca_pairdraws": {"response_weight": 1.0, "gene_init": "pca", "pair_draws": 2, "own_token_dropout": 0.1,
                               "neighbour_offsets": True},
    "plain": {"token_bias": False, "target_offsets": False, "mask_repeats_in_loss": False, "keep_best": True},
}
TIMING = re.compile(r'"(seconds|[a-z_]*_s)": [0-9.]+(, )?')


def fingerprint() -> dict:
    import torch

    import virtualcell as vc
    from virtualcell.train import TrainConfig, train

    torch.set_num_threads(1)
    adata = vc.datasets.load("papalexi2021")
    out = {}
    for name, extra in RUNS.items():
        cfg = TrainConfig(max_steps=40, eval_every=10, save_every=20, seed=0, threads=1, attention="eager",
                          precision="fp32", compile="off", holdout={"bio_rep": ["rep_3"]}, top_k=50,
                          verdict_samples=(1,), verdict_temperatures=(1.0,), **extra)
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            m = train(adata, out=d, config=cfg, progress=False)
        h = hashlib.sha256()
        for k, v in sorted(m.lm.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().numpy().tobytes())
        history = [{k: v for k, v in r.items() if k in ("step", "loss", "val_loss", "lr")} for r in m.train_config["history"]]
        verdict = TIMING.sub("", json.dumps(m.verdict, sort_keys=True, default=str))
        out[name] = {"weights": h.hexdigest()[:16], "history": hashlib.sha256(json.dumps(history).encode()).hexdigest()[:16],
                     "verdict": hashlib.sha256(verdict.encode()).hexdigest()[:16],
                     "last_loss": history[-1].get("loss") if history else None, "seconds": round(time.perf_counter() - t)}
        print(name, out[name], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", default=None, help="another fingerprint's json")
    args = ap.parse_args(argv)
    fp = fingerprint()
    Path(args.out).write_text(json.dumps(fp, indent=1))
    if args.compare:
        other = json.loads(Path(args.compare).read_text())
        keys = ("weights", "history", "verdict")
        differ = {n: [k for k in keys if fp[n][k] != other.get(n, {}).get(k)] for n in fp}
        for n, d in differ.items():
            print(f"{n}: {'the same' if not d else 'differs in ' + ', '.join(d)}")
        return 1 if any(differ.values()) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
