"""Probe: how often does a synthetic-screen model write a knocked-out gene into the knocked-out cell's sentence?

    python probe_gen.py MODEL_DIR [--seed 1]

MODEL_DIR is a model trained by ``experiments/synthetic_recovery.py --seed S --model-dir DIR``
(its ``DIR/synthetic``). For each knockout below, 40 held-out typeA control cells are written
under the knockout and under control (temperature 1, the model's own sentence length), and the
fraction of sentences holding the target gene is printed next to its fraction in the prompts.
In the measured (synthetic) knocked-out cells the target is 0: a knockout removes its gene.
"""
import argparse

import numpy as np
import torch

import virtualcell as vc
from virtualcell.generation import GenerationConfig

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--seed", type=int, default=1)
args = ap.parse_args()
torch.set_num_threads(1)
data = vc.datasets.synthetic_screen(seed=args.seed)
base, _ = vc.evaluate.split_controls(data, seed=args.seed)
model = vc.C2SModel.load(args.model)
print("target offsets:", model.target_offsets)
cells = base[base.obs["cell_type"] == "typeA"][:40].copy()
sents = vc.sentences.encode(cells, vocab=model.genes, top_k=model.top_k)
names = ["GENE162", "GENE077", "TF02", "TF10", "TF14", "TF01"]
panel = model.resolve(names + ["control"])
out = list(model.generate(sents, panel, config=GenerationConfig(max_genes=model.top_k, temperature=1.0, seed=0)))
gid = {g: i for i, g in enumerate(model.genes.genes)}
for pi, n in enumerate(names):
    j = gid[n]
    under_ko = [j in list(s) for ch in out for p, s in zip(ch.perturbation, ch.sentences) if p == pi]
    under_ctrl = [j in list(s) for ch in out for p, s in zip(ch.perturbation, ch.sentences) if p == len(names)]
    in_prompt = [j in list(sents[i][: model.top_k]) for i in range(len(sents))]
    print(f"{n}: in prompt {np.mean(in_prompt):.2f}  written under control {np.mean(under_ctrl):.2f}  "
          f"under its knockout {np.mean(under_ko):.2f}")
