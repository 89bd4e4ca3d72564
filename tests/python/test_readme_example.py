"""Every Python example in README.md runs. Each block is named by the comment before it,
`<!-- example: NAME -->`: "answer" runs as written, its three settings lines pointed at the
shipped synthetic model, an RPN built on it and two of its images; "ops", "label-maps" and
"train-step" run on inputs defined here for the names they take from the reader's own code
(a LLaVA-1.5-7B-shaped model of tiny width stands in for the 7B); a name with "(not run: ...)"
says why it is not run."""

import copy
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from attention_samples import make_attention_inputs
from label_samples import make_label_inputs
from rpn_samples import make_rpn_inputs
from sink_samples import make_hidden
from tiny_llava import EOS, make_tiny_llava, make_tokenizer, one_thread, teacher_forced_batch

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
MARKER = re.compile(r"<!-- example: ([\w-]+)(?: \((not run: [^)]+)\))? -->\n```python\n(.*?)```", re.S)


def examples() -> dict[str, str]:
    with open(README) as f:
        text = f.read()
    found = {m.group(1): (m.group(2), m.group(3)) for m in MARKER.finditer(text)}
    assert len(found) == text.count("```python"), "every ```python block in README.md needs an example marker"
    return found


def run(name: str, **names) -> dict:
    skip_reason, code = examples()[name]
    assert skip_reason is None, f"example {name} is marked {skip_reason!r}"
    namespace = {"__name__": "__main__", **names}
    with one_thread():
        exec(compile(code, f"README.md example {name}", "exec"), namespace)
    return namespace


def test_every_example_is_run_or_says_why_not():
    runs = {name for name, (skip, _) in examples().items() if skip is None}
    assert runs == {"ops", "label-maps", "train-step", "answer"}
    assert examples()["hub"][0] == "not run: it writes to the Hugging Face Hub"


def test_answer_example_as_written_on_the_synthetic_model(tmp_path, capsys):
    from sdrpn.llava.loading import load_llava
    from sdrpn.llava.presets import resolve_preset
    from sdrpn.rpn.model import RegionProposalNetwork
    from sdrpn.synth.pipeline import BASE_MODEL
    from sdrpn.synth.task import make_sample

    model, _ = load_llava(BASE_MODEL, "fp32")
    preset = resolve_preset(None, model)
    rpn = RegionProposalNetwork.from_llava(
        model, preset.branch_layer, preset.depth, prompt_template=preset.prompt_template, roi=preset.roi
    )
    rpn.save_pretrained(tmp_path / "rpn")
    samples = [make_sample(seed, kind=kind) for seed, kind in ((1, "read"), (2, "colour"))]
    paths = [str(tmp_path / f"{s.id}.png") for s in samples]
    for s, path in zip(samples, paths):
        s.image.save(path)
    settings = {
        "MODEL, RPN = ": f"MODEL, RPN = {BASE_MODEL!r}, {str(tmp_path / 'rpn')!r}",
        "DTYPE, DEVICE = ": 'DTYPE, DEVICE = "fp32", "cpu"',
        "IMAGES, QUESTIONS = ": f"IMAGES, QUESTIONS = {paths!r}, {[s.question for s in samples]!r}",
    }
    _, code = examples()["answer"]
    lines = code.splitlines()
    for start, line in settings.items():
        (index,) = [i for i, text in enumerate(lines) if text.startswith(start)]  # each once
        lines[index] = line
    with one_thread():
        namespace = {"__name__": "__main__"}
        exec(compile("\n".join(lines), "README.md example answer", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"{samples[0].question} -> ") and printed[1].startswith(samples[1].question)
    assert namespace["pipe"].roi.threshold == rpn.config.task_thresholds["textvqa"]
    assert len(namespace["answers"]) == 2 and len(namespace["rois"]) == 2
    assert printed[2] == repr(namespace["base"].generate(namespace["images"], namespace["QUESTIONS"], 128))


def test_ops_example():
    labels = make_label_inputs(3, 24, 24)
    attention = make_attention_inputs(padding="left")
    args, kwargs = make_rpn_inputs()
    names = {
        "grounding": labels.grounding,
        "sink": labels.sink,
        "grid_h": labels.grid_h,
        "grid_w": labels.grid_w,
        "hidden": make_hidden(2, 8, hidden_size=2600, dims=(2533, 1415)),
        "query": attention.query,
        "key": attention.key,
        "query_positions": attention.query_positions,
        "key_start": attention.key_start,
        "key_length": attention.key_length,
        "mask": attention.key_padding_mask,
        "query_states": args[0],
        "visual_states": args[1],
        "q_proj": SimpleNamespace(weight=args[2]),
        "k_proj": SimpleNamespace(weight=args[3]),
        "num_heads": args[4],
        "prob": torch.rand(2, 24, 24, generator=torch.Generator().manual_seed(0)),
    }
    done = run("ops", **names)
    assert done["labels"].shape == (3, 576) and done["counts"].shape == (3, 3)
    assert done["sinks"].shape == (2, 8) and done["rows"].shape[:3] == attention.query.shape[:3]
    assert done["scores"].shape == (3, 7) and done["keep"].shape[1:] == (24, 24)


@pytest.fixture(scope="module")
def llava_7b_shaped():
    """LLaVA-1.5-7B's shape where the examples read it (32 heads, the 24x24 grid, layers up
    to the RPN's 15 + 3) at a tiny width, with a batch of [prompt, answer] samples."""
    tiny = make_tiny_llava(num_layers=18, grid=24, num_key_value_heads=8, num_attention_heads=32)
    batch = teacher_forced_batch(tiny, [[7, 8, 9], [10, 11]], [[12, EOS], [13, 14, EOS]])
    return tiny.model, batch


def test_label_maps_example(llava_7b_shaped, capsys):
    model, batch = llava_7b_shaped
    image = Image.fromarray(torch.randint(0, 256, (200, 300, 3), dtype=torch.uint8).numpy())
    maps = run("label-maps", model=model, tokenizer=make_tokenizer(), image=image)["maps"]
    assert capsys.readouterr().out == "torch.Size([1, 576]) torch.Size([1, 576])\n"
    assert maps.grounding.shape == maps.sink.shape == (1, 576)
    # The commented call, on a hand-made batch.
    from sdrpn.llava import LLAVA15_7B, attention_maps

    assert attention_maps(model, batch, LLAVA15_7B, num_cells=576).grounding.shape == (2, 576)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_train_step_example(llava_7b_shaped, dtype):
    llava, batch = llava_7b_shaped
    labels = torch.randint(-1, 2, (2, 576), generator=torch.Generator().manual_seed(0))
    labels[labels == -1] = -100
    names = {
        "llava": copy.deepcopy(llava).to(dtype),  # load_llava's default is bf16
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "pixel_values": batch.pixel_values,
        "labels": labels,
    }
    done = run("train-step", **names)
    loss = done["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    loss.backward()  # float32 gradients for float32 weights, whatever the backbone's dtype
    assert {p.dtype for p in done["rpn"].parameters()} == {torch.float32}
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in done["rpn"].parameters())


def test_the_synthetic_stages_by_hand_run_as_written(tmp_path):
    """The shell block of the synthetic task's stages, with fewer images and one epoch: each
    command runs, and the answers file holds an answer per test question."""
    with open(README) as f:
        small = re.search(r"<!-- example: synth-stages -->\n```sh\n(.*?)```", f.read(), re.S).group(1)
    for as_written, smaller in (
        ("'train', 300", "'train', 48"),
        ("'test', 40", "'test', 4"),
        ("--epochs 3", "--epochs 1"),
    ):
        assert as_written in small, as_written
        small = small.replace(as_written, smaller)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], OMP_NUM_THREADS="1")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", small], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "answers.jsonl") as f:
        assert [json.loads(line)["index"] for line in f] == [0, 1, 2, 3]
