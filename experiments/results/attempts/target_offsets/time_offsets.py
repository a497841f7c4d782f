"""Probe: what the target offsets cost a training step (the bundled recipe, group 4, 1 thread).

    python experiments/results/attempts/target_offsets/time_offsets.py [--steps 200] [--chunk 10]

Two sides of ``experiments/bench_training.py`` from the same weights and pairs, interleaved every
``--chunk`` steps: the trainer's step as the benchmark times it, and the same step with the offsets
(the batch's named targets packed, the offsets added to the logits in the loss, the parameter in the
optimizer), as ``virtualcell train`` runs it. Prints median seconds a step and the training loss of
the last 30 steps for each.
"""
import argparse
import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "experiments"))
import bench_training as B  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=200)
ap.add_argument("--chunk", type=int, default=10)
args = ap.parse_args()
warnings.filterwarnings("ignore")


class WithOffsets(B.Side):
    def __init__(self, *a, **k) -> None:
        import torch

        from virtualcell import target_offsets

        super().__init__(*a, **k)
        self.offsets = target_offsets.attach(self.lm)
        self.opt = torch.optim.AdamW(self.lm.parameters(), lr=self.ctx[0].lr, weight_decay=self.ctx[0].weight_decay,
                                     betas=(0.9, 0.95))

    def loss(self, chunks, train: bool):  # noqa: ANN001, ANN201
        from virtualcell.training.batching import pack
        from virtualcell.training.loss import response_loss

        b = pack(self.groups(chunks), self.fmt.pad, named=self.fmt.named_targets)
        return (*response_loss(self.lm, b, allowed=self.allowed, no_repeat=True, offsets=self.offsets), b.n_tokens, 0.0)


ctx = B.prepare(0)
from virtualcell.train import _new_model  # noqa: E402

lm0, _, _ = _new_model(ctx[0], None, ctx[1], ctx[2])
init = {k: v.clone() for k, v in lm0.state_dict().items()}
sides = [B.Side("trainer", "trainer", 4, 1, ctx, init), WithOffsets("trainer + target offsets", "trainer", 4, 1, ctx, init)]
B.interleave(sides, args.steps, args.chunk)
for s in sides:
    extra = f", knockout offset {s.offsets.detach().tolist()[0] * 10:+.3f}" if hasattr(s, "offsets") else ""
    print(f"{s.name}: median {statistics.median(s.seconds[3:]) * 1000:.1f} ms/step, "
          f"train loss last 30 {statistics.mean(s.losses[-30:]):.4f}{extra}")
