"""Documents of the synthetic task for lmms-eval: LLaVA-format records (write_dataset's),
images under images/ beside test.json in the working folder; scored with the synthetic
task's own exact match."""

import os

from sdrpn.llava.inputs import load_rgb
from sdrpn.synth.metrics import normalise_answer


def doc_to_visual(doc):
    return [load_rgb(os.path.join(os.getcwd(), "images", doc["image"]))]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["conversations"][0]["value"].replace("<image>", "").strip()


def doc_to_target(doc):
    return doc["conversations"][1]["value"]


def process_results(doc, results):
    return {"exact_match": float(normalise_answer(results[0]) == normalise_answer(doc_to_target(doc)))}
