"""Image AUROC of one checkpoint under other inference settings, on a held-out crop folder.

The paper fixes the network but leaves open what inference uses: the two timesteps of the
norm-guided estimate (DiffusionAD uses 200 and 400), the guidance weight and the top-k of the
image score. None of them changes the weights, so they can be chosen after training, on the
*holdout* scenes of ``edge prepare-crops`` (never on the test scenes)::

    .venv/bin/python scripts/sweep_inference.py runs/NAME/best.pt DATA/holdout \\
        --timesteps 200,400 150,300 250,500 --top-k 16 32 64

Prints one JSON line per setting, best last; ``--write OUT.pt`` stores the checkpoint again
with the best setting in its config (same weights, same model id).
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from edge.evaluate.datasets import load_test_set
from edge.model.checkpoint import load_checkpoint, save_checkpoint
from edge.model.detector import DiffFastener


def with_inference(model: DiffFastener, **settings) -> DiffFastener:
    """The same weights under other inference settings: diffusion fields and ``top_k``."""
    top_k = settings.pop("top_k", model.config.top_k)
    diffusion = model.config.diffusion.model_copy(update=settings)
    variant = DiffFastener(model.config.model_copy(update={"diffusion": diffusion, "top_k": top_k}))
    variant.load_state_dict(model.state_dict())
    return variant.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("data_dir", help="MVTec-layout folder of held-out crops with defects")
    parser.add_argument("--timesteps", nargs="+", default=["200,400"], help="T_SMALL,T_LARGE")
    parser.add_argument("--guidance", nargs="+", type=float, default=[1.0])
    parser.add_argument("--top-k", nargs="+", type=int, default=[16])
    parser.add_argument("--write", help="save the checkpoint with the best setting here")
    args = parser.parse_args()

    model, payload = load_checkpoint(args.checkpoint)
    config = model.config
    data = load_test_set(args.data_dir, config.image_size, config.in_channels)
    crops = torch.from_numpy(data.crops)
    results = []
    for timesteps, guidance in itertools.product(args.timesteps, args.guidance):
        t_small, t_large = (int(value) for value in timesteps.split(","))
        variant = with_inference(model, t_small=t_small, t_large=t_large, guidance_w=guidance)
        with torch.inference_mode():
            maps = torch.cat([variant(batch)[0] for batch in crops.split(32)]).flatten(1)
        for top_k in args.top_k:
            scores = maps.topk(top_k, dim=1).values.mean(dim=1).numpy()
            auroc = float(roc_auc_score(data.labels, scores))
            kinds = {
                kind: round(float(roc_auc_score(data.labels[keep], scores[keep])), 4)
                for kind in sorted(set(data.defect_types) - {"good"})
                for keep in [(data.labels == 0) | (np.array(data.defect_types) == kind)]
            }
            results.append(
                {
                    "t_small": t_small,
                    "t_large": t_large,
                    "guidance_w": guidance,
                    "top_k": top_k,
                    "image_auroc": round(auroc, 4),
                    "per_defect": kinds,
                }
            )
    results.sort(key=lambda row: row["image_auroc"])
    for row in results:
        print(json.dumps(row))
    if args.write:
        best = results[-1]
        keys = ("t_small", "t_large", "guidance_w", "top_k")
        shipped = with_inference(model, **{key: best[key] for key in keys})
        extra = dict(payload["extra"], inference_sweep={"data_dir": args.data_dir, **best})
        save_checkpoint(args.write, shipped, step=payload["step"], extra=extra)


if __name__ == "__main__":
    main()
