"""Run under torchrun with 2 ranks (test_train.py): optimiser steps in which rank 1's last
micro-batch, or all of its micro-batches, were dropped (images that could not be read).

Each rank writes OUT/rank{r}.json: the gradients the optimiser saw in each step against the
average of the ranks' own gradients (computed here without DDP), and whether the ranks'
parameters still agree."""

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sdrpn.llava.loading import load_llava
from sdrpn.rpn.model import rpn_loss
from sdrpn.rpn.train import RPNTrainer, _forward
from sdrpn.rpn.train_config import TrainConfig

model_dir, labels, out = sys.argv[1:4]
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
model, tok = load_llava(model_dir, "fp32")
cfg = TrainConfig(labels=labels, out=out, branch_layer=1, depth=2, batch_size=4, held_out_fraction=0)
trainer = RPNTrainer(cfg, model, tok, rank=rank, world_size=world)
train_set, _ = trainer._datasets()
rpn = trainer._rpn()
optimizer, scheduler, _ = trainer._schedule(rpn, len(train_set))


def batch(first: int):
    return trainer.collator([train_set[i] for i in range(first, first + 4)])


# Step 1: rank 1's last micro-batch is dropped; step 2: all of rank 1's are.
steps = [[batch(0), batch(4)], [batch(8), batch(12)]] if rank == 0 else [[batch(16), None], [None, None]]
seen = []
clip = torch.nn.utils.clip_grad_norm_


def record_then_clip(params, *args, **kwargs):  # the all-reduced gradients, before clipping
    params = list(params)
    seen.append([p.grad.clone() for p in params])
    return clip(params, *args, **kwargs)


torch.nn.utils.clip_grad_norm_ = record_then_clip
ddp = DistributedDataParallel(rpn)
report = {"steps": []}
for micro in steps:
    expected = [torch.zeros_like(p) for p in rpn.parameters()]
    for b in micro:  # this rank's own gradients, then their average over the ranks
        if b is not None:
            logits, target = _forward(model, rpn, 1, b, trainer.image_token_id, trainer.device, trainer._autocast)
            grads = torch.autograd.grad(rpn_loss(logits, target) / len(micro), list(rpn.parameters()))
            expected = [e + g for e, g in zip(expected, grads)]
    for e in expected:
        dist.all_reduce(e)
        e /= world
    before = len(seen)
    trainer._step(ddp, optimizer, scheduler, len(micro), iter(micro))
    got = seen[before]
    flat = torch.cat([p.detach().flatten() for p in rpn.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    report["steps"].append(
        {
            "max_gradient_error": max(float((g - e).abs().max()) for g, e in zip(got, expected)),
            "max_gradient": max(float(e.abs().max()) for e in expected),
            "ranks_agree": all(torch.equal(gathered[0], g) for g in gathered),
        }
    )
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(report, f)
dist.destroy_process_group()
