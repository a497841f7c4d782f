"""Probe: the synthetic screen scored with a knockout's target gene forbidden at generation (post hoc), by a fixed
logit offset B on it (the model before target offsets; run from the repository root).

    python experiments/results/attempts/target_offsets/probe_bias.py -20 --seed 1 --threads 2 --model MODEL_DIR

forbid_at_generation/ holds its output for B = -20 on the seed-1 model of session 31."""
import sys, runpy, torch
import virtualcell.generation as G
import virtualcell.model as M
B = float(sys.argv.pop(1))
KO = None
SUFFIX_TARGETS = {}
orig_grid = M.generate_grid
def grid(lm, prefixes, suffixes, **kw):
    SUFFIX_TARGETS.clear()
    for j, s in enumerate(suffixes):
        SUFFIX_TARGETS[j] = [s[i + 1] for i, t in enumerate(s[:-1]) if t == KO]
    return orig_grid(lm, prefixes, suffixes, **kw)
M.generate_grid = grid
orig_loop = G._sample_loop
def loop(decoder, last_pos, logits, keys, rows_cell, rows_suffix, constraint, *a, **k):
    constraint.rows = [SUFFIX_TARGETS.get(s, []) if s >= 0 else [] for s in rows_suffix]
    return orig_loop(decoder, last_pos, logits, keys, rows_cell, rows_suffix, constraint, *a, **k)
G._sample_loop = loop
orig_start, orig_mask = G.GeneConstraint.start, G.GeneConstraint.mask
def start(self, rows, device):
    st = orig_start(self, rows, device)
    bias = torch.zeros(rows, self.vocab_size, device=device)
    for r, ts in enumerate(self.rows):
        for t in ts: bias[r, t] = B
    st["bias"] = bias
    return st
def mask(self, state, logits, cfg):
    return orig_mask(self, state, logits + state["bias"], cfg)
G.GeneConstraint.start, G.GeneConstraint.mask = start, mask
import virtualcell as vc
m = vc.C2SModel.load([a for a in sys.argv if 'model' in a and '/' in a][0])
KO = m.tokenizer.convert_tokens_to_ids('<ko>')
print('ko token', KO)
sys.path.insert(0, 'experiments')
runpy.run_path('experiments/synthetic_recovery.py', run_name='__main__')
