"""Does a model read the dose? Likelihood of measured cells under prompts at each dose.

    python experiments/dose_likelihood.py --model DIR [--seed 0] [--target drugA@10] \
        [--prompts drug:drugA@10,drug:drugA@0.1,drug:drugA@1,drug:drugE@1,control]

DIR is a model trained on the synthetic screen's training cells as ``synthetic_recovery.py``
trains it (``--train DIR`` trains one first: 7 minutes, 1 thread). For 60 measured cells of
``--target`` in typeA, each paired with one of 60 typeA control cells, it prints the mean
negative log-likelihood per gene of the measured sentence under each prompt. A model that reads
the dose scores a drugA@10 cell better under drugA@10 than under drugA@0.1; one that only knows
the drug scores them alike (session 22: 5.2407 / 5.2417 nats, with the doses pooled in training).
"""

from __future__ import annotations

import argparse
import functools
import sys

from synthetic_recovery import CONTEXT, TOP_K


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--train", action="store_true", help="train the model into --model first (synthetic_recovery's recipe)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", default="drugA@10,drugA@0.1,control", help="conditions whose cells are scored")
    ap.add_argument("--prompts", default="drug:drugA@10,drug:drugA@0.1,drug:drugA@1,drug:drugE@1,control")
    args = ap.parse_args(argv)

    import torch

    import virtualcell as vc
    from virtualcell.perturbations import parse
    from virtualcell.sentences import encode

    torch.set_num_threads(1)
    data = vc.datasets.synthetic_screen(seed=args.seed)
    if args.train:
        from virtualcell.train import TrainConfig, train

        _, rest = vc.evaluate.split_controls(data, seed=args.seed)
        train(rest, out=args.model, progress=False, config=TrainConfig(
            max_minutes=7.0, max_steps=3000, kind_key="perturbation_type", seed=args.seed, top_k=TOP_K))
    model = vc.C2SModel.load(args.model)
    fmt, lm = model.format, model.lm.eval()
    obs = data.obs
    in_ctx = (obs["cell_type"] == CONTEXT).to_numpy()
    controls = encode(data[in_ctx & (obs["condition"] == "control").to_numpy()][:60], top_k=model.top_k,
                      vocab=model.genes)

    @functools.cache
    def measured(condition: str):  # noqa: ANN202
        """The condition's first 60 typeA cells as sentences, encoded once for all the prompts."""
        return encode(data[in_ctx & (obs["condition"] == condition).to_numpy()][:60], top_k=model.top_k,
                      vocab=model.genes)

    def nll(condition: str, prompt: str) -> float:
        cells = measured(condition)
        total = 0.0
        for i in range(len(cells.offsets) - 1):
            pre = fmt.prefix(controls.ids[controls.offsets[i]:controls.offsets[i + 1]]) + fmt.suffix(parse(prompt))
            resp = fmt.response(cells.ids[cells.offsets[i]:cells.offsets[i + 1]])
            with torch.no_grad():
                logp = lm(torch.tensor([pre + resp])).logits[0, len(pre) - 1:-1].log_softmax(-1)
            total += -logp[torch.arange(len(resp)), torch.tensor(resp)].mean().item()
        return total / (len(cells.offsets) - 1)

    prompts = args.prompts.split(",")
    print("| cells of | " + " | ".join(prompts) + " |")
    print("|---" * (len(prompts) + 1) + "|")
    for condition in args.target.split(","):
        print(f"| {condition} | " + " | ".join(f"{nll(condition, p):.4f}" for p in prompts) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
