"""The lmms-eval model `sdrpn_llava` run by lmms-eval's own command line on a local task (the
synthetic fine-detail task, lmms_eval_task/) with the shipped synthetic model and a small
RPN: the score lmms-eval reports, and every answer, equal sdrpn's own synthetic evaluation
of the same samples, with RoI crops and without (roi=false)."""

import glob
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

# Skipped only where lmms-eval is not installed at all: an installed one that fails to
# import is a failure.
if importlib.util.find_spec("lmms_eval") is None:
    pytest.skip("lmms-eval is not installed: scripts/setup.sh installs the eval extra", allow_module_level=True)

from lmms_eval.api.instance import Instance  # noqa: E402

from sdrpn.integrations.lmms_eval import SDRPNLlavaEval  # noqa: E402
from sdrpn.llava.loading import load_llava  # noqa: E402
from sdrpn.llava.presets import resolve_preset  # noqa: E402
from sdrpn.rpn.model import RegionProposalNetwork  # noqa: E402
from sdrpn.synth.evaluate import answer_with_views  # noqa: E402
from sdrpn.synth.metrics import accuracy  # noqa: E402
from sdrpn.synth.pipeline import BASE_MODEL, PipelineConfig, sdrpn_answers  # noqa: E402
from sdrpn.synth.task import make_sample, split_seeds, write_dataset  # noqa: E402
from tiny_llava import one_thread  # noqa: E402

TASK_DIR = os.path.join(os.path.dirname(__file__), "lmms_eval_task")
COUNT, BATCH, MAX_NEW = 24, 8, 12  # MAX_NEW: the task's max_new_tokens


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """The test split as write_dataset writes it, the shipped model and an RPN built on it
    with the model's preset (its template and RoI options but the threshold), saved as a
    Hub-style folder."""
    root = tmp_path_factory.mktemp("lmms_eval")
    write_dataset(str(root / "data"), "test", COUNT)
    model, tokenizer = load_llava(BASE_MODEL, "fp32")
    preset = resolve_preset(None, model)
    rpn = RegionProposalNetwork.from_llava(
        model,
        preset.branch_layer,
        preset.depth,
        preset=preset.name,
        prompt_template=preset.prompt_template,
        # This RPN is untrained and its maps are flat: a relative threshold (above 80% of a
        # map's peak) gives most samples a crop, so that the crops are exercised.
        roi=replace(preset.roi, threshold=-0.8),
    ).eval()
    rpn.save_pretrained(root / "rpn")
    samples = [make_sample(seed) for seed in split_seeds("test", COUNT)]
    return {"root": root, "model": model, "tokenizer": tokenizer, "samples": samples}


def start_lmms_eval(root, model_args: str, name: str) -> subprocess.Popen:
    """`python -m lmms_eval` on the local task, offline, writing to root/name."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(root / f"datasets_cache_{name}"),
        OMP_NUM_THREADS="1",
    )
    command = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "sdrpn_llava",
        "--model_args",
        model_args,
        "--tasks",
        "sdrpn_synth",
        "--include_path",
        TASK_DIR,
        "--batch_size",
        str(BATCH),
        "--output_path",
        str(root / name),
        "--log_samples",
        "--verbosity",
        "WARNING",
    ]
    # The task reads test.json and images/ from the folder it runs in; the log goes to a file,
    # which unlike a pipe never stalls a run that is not being read yet.
    with open(root / f"{name}.log", "w") as log:
        return subprocess.Popen(command, cwd=root / "data", env=env, stdout=log, stderr=subprocess.STDOUT)


def finish_lmms_eval(process: subprocess.Popen, out) -> tuple[float, list[str]]:
    """The exact match lmms-eval reports and its answers in document order."""
    process.wait(timeout=600)
    assert process.returncode == 0, open(f"{out}.log", errors="replace").read()[-6000:]
    (results_file,) = glob.glob(str(out / "*" / "*_results.json"))
    (samples_file,) = glob.glob(str(out / "*" / "*_samples_sdrpn_synth.jsonl"))
    score = json.load(open(results_file))["results"]["sdrpn_synth"]["exact_match,none"]
    rows = sorted((json.loads(line) for line in open(samples_file)), key=lambda r: r["doc_id"])
    assert [r["doc_id"] for r in rows] == list(range(COUNT))
    return score, [r["filtered_resps"] for r in rows]


@pytest.fixture(scope="module")
def lmms_eval_rows(synth):
    """The SD-RPN row and the baseline row (roi=false, no RPN), run side by side."""
    root = synth["root"]
    rows = {
        "sdrpn": f"pretrained={BASE_MODEL},rpn={root / 'rpn'},dtype=fp32,device=cpu",
        "baseline": f"pretrained={BASE_MODEL},roi=false,dtype=fp32,device=cpu",
    }
    running = {name: start_lmms_eval(root, args, name) for name, args in rows.items()}
    try:
        return {name: finish_lmms_eval(process, root / name) for name, process in running.items()}
    finally:
        for process in running.values():
            if process.poll() is None:
                process.kill()


def test_sdrpn_row_equals_sdrpn_own_evaluation(synth, lmms_eval_rows):
    score, answers = lmms_eval_rows["sdrpn"]
    model, tokenizer, samples = synth["model"], synth["tokenizer"], synth["samples"]
    rpn = RegionProposalNetwork.load(str(synth["root"] / "rpn"), model)
    cfg = PipelineConfig(out=str(synth["root"] / "own"), eval_batch=BATCH, max_new_tokens=MAX_NEW)
    with one_thread():
        own = sdrpn_answers(cfg, model, tokenizer, rpn, samples)
    assert sum(bool(a.rois.boxes) for a in own) >= COUNT // 4  # the crops are exercised
    assert answers == [a.text for a in own]
    assert score == pytest.approx(accuracy([a.text for a in own], [s.answer for s in samples]), abs=1e-12)


def test_baseline_row_equals_the_base_model(synth, lmms_eval_rows):
    score, answers = lmms_eval_rows["baseline"]
    samples = synth["samples"]
    with one_thread():
        own = answer_with_views(synth["model"], synth["tokenizer"], samples, "none", BATCH, max_new_tokens=MAX_NEW)
    assert answers == own
    assert score == pytest.approx(accuracy(own, [s.answer for s in samples]), abs=1e-12)


def test_lmms_eval_finds_the_model_by_its_entry_point():
    from lmms_eval.models import get_model

    assert get_model("sdrpn_llava") is SDRPNLlavaEval


@pytest.fixture(scope="module")
def baseline_model():
    # model_args win over lmms-eval's own --batch_size (which always arrives, default 1).
    return SDRPNLlavaEval.create_from_arg_string(
        f"pretrained={BASE_MODEL},roi=false,dtype=fp32,device=cpu,batch_size=4", {"batch_size": 1, "device": None}
    )


def request(gen_kwargs: dict, doc_id: int = 0, question: str = "What colour is the tag?", visual=None) -> Instance:
    """A generate_until request as lmms-eval builds one for document doc_id of task "synth"."""
    doc_to_visual = visual or (lambda doc: [doc["sample"].image])
    arguments = (question, gen_kwargs, doc_to_visual, doc_id, "synth", "test")
    return Instance("generate_until", arguments, doc_id, {"task": "synth", "doc_id": doc_id, "repeats": 1})


def test_generate_until_is_greedy_and_cuts_at_stop_strings(baseline_model):
    model = baseline_model
    assert model.batch_size == 4
    samples = [make_sample(seed, kind="colour") for seed in split_seeds("test", 5)]
    model.task_dict = {"synth": {"test": [{"sample": s} for s in samples]}}
    greedy = {"max_new_tokens": 8, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False}
    with one_thread():
        full = model.generate_until([request(dict(greedy, until=["\n\n"]), i) for i in range(5)])
        expected = answer_with_views(model.model, model.tokenizer, samples, "none", 4, max_new_tokens=8)
        assert full == expected
        assert len(full[0]) >= 2, full
        stop = full[0][1:2]  # a stop string inside the first answer: it is cut before it
        cut = model.generate_until([request(dict(greedy, until=[stop]), 0)])
    assert cut == [full[0][: full[0].index(stop)]]
    with pytest.raises(ValueError, match="temperature=0.7"):
        model.generate_until([request(dict(greedy, temperature=0.7))])
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        model.loglikelihood([])
    with pytest.raises(NotImplementedError, match="multi-round"):
        model.generate_until_multi_round([])


def test_a_question_past_the_context_is_answered_empty_and_named(baseline_model, caplog):
    model = baseline_model
    samples = [make_sample(seed, kind="colour") for seed in split_seeds("test", 5)]
    model.task_dict = {"synth": {"test": [{"sample": s} for s in samples]}}
    greedy = {"max_new_tokens": 4, "until": ["\n\n"]}
    long_question = " ".join(["colour"] * (model.model.config.text_config.max_position_embeddings + 1))
    with one_thread():
        alone = model.generate_until([request(greedy, i) for i in (0, 2, 4)])
        with caplog.at_level("WARNING", logger="sdrpn.integrations.lmms_eval"):
            got = model.generate_until(
                [request(greedy, 0), request(greedy, 1, question=long_question), request(greedy, 2)]
            )
    assert got == [alone[0], "", alone[1]]
    assert "task 'synth' document 1 answered empty: its question makes a prompt of" in caplog.text
    assert "1 of 3 questions answered empty" in caplog.text
    # A whole batch (of 4) past the context, then one more: the batch answers nothing, the
    # next is answered, and the count covers both batches.
    assert model.batch_size == 4
    caplog.clear()
    with one_thread(), caplog.at_level("WARNING", logger="sdrpn.integrations.lmms_eval"):
        got = model.generate_until(
            [request(greedy, i, question=long_question) for i in range(4)] + [request(greedy, 4)]
        )
    assert got == ["", "", "", "", alone[2]]
    assert "4 of 5 questions answered empty" in caplog.text


def test_a_document_with_two_images_is_refused(baseline_model):
    model = baseline_model
    image = make_sample(1).image
    model.task_dict = {"synth": {"test": [{"sample": None}]}}
    two = request({}, 0, visual=lambda doc: [image, image])
    with pytest.raises(ValueError, match="one image per question; task 'synth' document 0 gives"):
        model.generate_until([two])


def test_each_task_takes_its_benchmark_threshold_from_the_rpn_folder(synth):
    rpn = str(synth["root"] / "rpn")
    args = f"pretrained={BASE_MODEL},rpn={rpn},task_preset=auto,crop_mode=mask,dtype=fp32,device=cpu"
    model = SDRPNLlavaEval.create_from_arg_string(args, {"batch_size": 1})
    thresholds = RegionProposalNetwork.load(rpn, model.model).config.task_thresholds
    for task, benchmark in (("textvqa_val", "textvqa"), ("ocrbench", "ocrbench"), ("hrbench8k", "hrbench")):
        roi = model._pipe(task).roi
        assert roi.threshold == thresholds[benchmark] and roi.crop_mode == "mask"
    with pytest.raises(ValueError, match="no threshold for the lmms-eval task 'synth'"):
        model._pipe("synth")
