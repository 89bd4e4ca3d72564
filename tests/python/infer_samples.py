"""What the answering tests share: the tiny LLaVA's grid and prompt template, questions,
seeded images of odd sizes, RPN logits high on chosen regions, and a pipeline on the tiny
model whose RPN may be forced to given logits."""

import torch
from PIL import Image

from sdrpn.infer.pipeline import SDRPNLlava
from sdrpn.rpn.model import RegionProposalNetwork
from tiny_llava import make_tokenizer

GRID = 4


TEMPLATE = "USER : <image>\n{question} ASSISTANT :"


QUESTIONS = ["what is the tag ?", "what colour is it ?", "is the tag red ?"]


def images(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = [(120, 60), (50, 100), (80, 80), (33, 71)]
    return [Image.fromarray((torch.rand(h, w, 3, generator=gen) * 255).byte().numpy()) for w, h in sizes[:n]]


def blob_logits(*boxes):
    """Logits (B, 16) that are high on the given [r0, c0, r1, c1) regions (None: no box)."""
    out = torch.full((len(boxes), GRID, GRID), -10.0)
    for b, box in enumerate(boxes):
        if box is not None:
            r0, c0, r1, c1 = box
            out[b, r0:r1, c0:c1] = 10.0
    return out.view(len(boxes), -1)


def pipeline(tiny, forced=None, **kwargs):
    rpn = RegionProposalNetwork.from_llava(tiny.model, branch_layer=2, depth=2)
    if forced is not None:
        calls = []

        def forward(hidden, mask, pos, visual):
            calls.append(hidden)
            return forced.to(hidden.device)

        rpn.forward = forward
    return SDRPNLlava(tiny.model, make_tokenizer(), rpn, **{"prompt_template": TEMPLATE, **kwargs})
