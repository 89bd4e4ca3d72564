"""The benchmark scripts must keep running: each is run once on a small size and must print
its keys. No timing is asserted: on a busy machine any ratio can round to zero."""

import gzip
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def run(script, *args):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), *args], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout[out.stdout.index("{") :])


@pytest.mark.parametrize(
    "script,args,key",
    [
        ("bench_labels.py", ["--batch", "64"], "speedup_vs_reference_loop"),
        ("bench_sinks.py", ["--batch", "1", "--seq-len", "32"], "speedup_vs_torch"),
    ],
)
def test_op_benchmarks_print_ratios(script, args, key):
    assert isinstance(run(script, *args)[key], float)


def test_label_memory_benchmark_measures_both_ways_at_each_batch_size():
    result = run("bench_label_memory.py", "--size", "tiny", "--text-layers", "4", "--batch-sizes", "1", "2")
    for way in ("held_qk_one_forward", "sdrpn"):
        assert set(result["peak_MiB"][way]) == {"1", "2"} and result["seconds"][way]["2"] > 0
    assert "sdrpn_vs_held_per_sample" in result and result["probed_layers"] == [1, 2]


def test_attention_backends_benchmark_runs_sdrpns_side_on_the_cpu():
    """cuDNN's side needs a GPU; on the CPU every case runs through sdrpn's kernels, and
    the backward's query gradient is finite."""
    cases = run("bench_attention_backends.py", "--heads", "2", "--head-dim", "16", "--repeats", "1")["cases"]
    assert len(cases) == 5 and all(set(row) == {"sdrpn"} and "warm_ms" in row["sdrpn"] for row in cases.values())
    assert cases["train_backward_bf16"]["sdrpn"]["nonfinite_grad_q"] == 0


@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    return tmp_path_factory.mktemp("profiles")


@pytest.fixture(scope="module")
def pipeline_results(profiles):
    """The pipeline benchmarks on a tiny model, under the step names scripts/gpu_check.sh
    gives their JSON in results.json."""
    label = ["--size", "tiny", "--samples", "4", "--reference-samples", "1", "--batch-sizes", "1", "2"]
    infer = ["--answer-tokens", "2", "--batch-sizes", "2", "--repeats", "1", "--profile", str(profiles / "infer")]
    return {
        "bench_infer_7b": run("bench_infer.py", *infer),
        "bench_label_pipeline_7b": run("bench_label_pipeline.py", *label, "--profile", str(profiles / "label")),
        "bench_train_rpn_7b": run("bench_train_rpn.py", "--batch", "2", "--steps", "1"),
        "bench_labels_cpu": run("bench_labels.py", "--batch", "64"),
        "bench_sinks_cpu": run("bench_sinks.py", "--batch", "1", "--seq-len", "32"),
        "bench_label_job_7b": run(
            "bench_label_job.py", *("--images 4 --image-size 96 64 --batch-size 2 --repeats 1 --workers 0 2".split())
        ),
    }


def test_label_pipeline_benchmark_runs_on_a_tiny_model(pipeline_results):
    row = pipeline_results["bench_label_pipeline_7b"]["results"][0]
    assert row["given"]["best_batch_size"] in (1, 2)
    assert "speedup_best_vs_reference" in row["self"]


def test_pipeline_benchmarks_keep_a_profile_of_each_way(pipeline_results, profiles):
    steps = {"infer": "bench_infer_7b", "label": "bench_label_pipeline_7b"}
    label_ways = ["given", "self", "reference_batch1"]  # and self_hf_decoder where self's decoder is not HF's
    label_ways += ["self_hf_decoder"] if pipeline_results[steps["label"]]["decoder"] != "hf" else []
    ways = {"infer": ["sdrpn", "baseline"], "label": label_ways}
    for bench, names in ways.items():
        profile = pipeline_results[steps[bench]]["profile"]
        for name in names:
            assert profile[f"{name}_s"] > 0 and isinstance(profile[f"{name}_host_syncs"], dict), (bench, name)
            with gzip.open(profiles / bench / f"{name}_trace.json.gz") as f:
                assert json.load(f)["traceEvents"], (bench, name)
            assert "Self CPU" in (profiles / bench / f"{name}_tables.txt").read_text()
        files = [f"{name}_{kind}" for name in names for kind in ("tables.txt", "trace.json.gz")]
        assert sorted(os.listdir(profiles / bench)) == sorted(files)


def test_figures_table_reads_every_pipeline_benchmark(pipeline_results, tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(pipeline_results))
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "figures.py"), str(path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "figure" not in line]
    assert len(rows) == 19
    assert [r for r in rows if "share of the batches' span between batches" in r][0].endswith("| - | reported |")
    assert "| CUDA graph captures that failed in the pipeline benchmarks (0 expected) | 0 | - | reported |" in rows
    assert [r for r in rows if "not measured" in r] == [  # a CPU run has no device memory to compare
        "| label job, given answers, peak GiB (target: the reference's) | - | - | not measured |"
    ]
    assert "| answering, batch 2, 2-token answers, bbox_1, vs `generate` |" in out.stdout
    assert "| answering, batch 2, 2-token answers, bbox_1, ATen ops dispatched vs `generate`'s |" in out.stdout
    path.write_text(json.dumps({"bench_train_rpn_7b": pipeline_results["bench_train_rpn_7b"]}))  # a cut-short run
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "figures.py"), str(path)], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.count("not measured") == 5
    # Odd shapes and values (a run cut short mid-row, a zero target) cost their rows only.
    odd = dict(pipeline_results)
    odd["bench_infer_7b"] = {"results": [{"batch": 1}]}
    odd["bench_sinks_cpu"] = {"speedup_vs_torch": "n/a"}
    odd["bench_infer_7b"]["graphs"] = {"pipeline_decoders": {"graphs": 0, "failed_captures": 1}}
    label = json.loads(json.dumps(pipeline_results["bench_label_pipeline_7b"]))
    label["results"][0]["reference_batch1"]["peak_GiB"] = 0.0
    label["results"][0]["given"]["by_batch_size"]["2"]["peak_GiB"] = 1.0
    label["results"][0]["given"]["best_batch_size"] = 2
    odd["bench_label_pipeline_7b"] = label
    path.write_text(json.dumps(odd))
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "figures.py"), str(path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "| bench_infer_7b: unreadable (KeyError: 'answer_tokens') | - | - | not measured |" in out.stdout
    assert "| label job, given answers, peak GiB (target: the reference's) | 1 | 0 | reported |" in out.stdout
    assert "float16, vs PyTorch | n/a | 1 | reported |" in out.stdout
    assert "| RPN training, minutes per 10K-sample epoch |" in out.stdout
    assert (
        "| CUDA graph captures that failed in the pipeline benchmarks (0 expected) | 1 | - | reported |" in out.stdout
    )


def test_rpn_scores_benchmark():
    result = run("bench_rpn_scores.py", "--batches", "2", "--cells", "16", "--hidden", "64", "--heads", "4")
    row = result["results"][0]
    assert "speedup" in row["forward"] and row["max_abs_diff_vs_naive"] < 1e-4


def test_train_benchmark_runs_on_a_tiny_model(pipeline_results):
    assert "samples_per_s" in pipeline_results["bench_train_rpn_7b"]["results"]["checkpointing"]


def test_infer_benchmark_runs_on_a_tiny_model(pipeline_results):
    row = pipeline_results["bench_infer_7b"]["results"][0]
    assert "throughput_vs_baseline" in row["bbox_2"]
    assert set(row["bbox_1"]["stages_s"]) >= {"prompt", "rpn", "boxes", "crop_encode", "pass2_decode"}
    # bbox mode feeds whole crops; mask mode one crop's kept tokens, fewer than two crops'.
    assert row["bbox_1"]["crop_tokens"] == [576, 576] and row["bbox_2"]["crop_tokens"] == [1152, 1152]
    assert 0 < row["mask_2"]["crop_tokens"][0] < 1152
    assert row["no_box"]["crop_tokens"] == [0, 0] and row["bbox_1_decoders_agree"] == 1.0
    # a batch of 2 and 1 boxes: pass 2 runs the two widths apart, computing no padding
    assert row["bbox_mixed"]["crop_tokens"] == [1152, 576]
    assert row["bbox_mixed"]["pass2_tokens"]["groups"] == 2
    assert row["bbox_mixed"]["pass2_tokens"]["in_groups"] < row["bbox_mixed"]["pass2_tokens"]["one_forward"]
    assert row["bbox_mixed_one_pass2_forward"]["pass2_tokens"]["groups"] == 1
    assert row["bbox_mixed_groups_agree"] == 1.0
    assert row["baseline_same_decoder_s"] > 0 and "throughput_vs_baseline" in row["bbox_1_hf_decoder"]
    assert row["reference_way_bbox_1"]["sdrpn_speedup_samples_per_s"] > 0
    # The host's work per call: the crops' encoding and pass 2 come on top of `generate`'s.
    assert row["aten_ops_vs_baseline"]["baseline"] == 1.0
    assert row["aten_ops"]["bbox_1"] > row["aten_ops"]["no_box"] > 0


def test_label_job_benchmark_runs_on_a_tiny_model(pipeline_results):
    result = pipeline_results["bench_label_job_7b"]
    assert set(result["results"]) == {"workers_0", "workers_2"}
    assert result["results"]["workers_0"]["speedup_vs_workers_0"] == 1.0
    # Decoding on the main thread happens between batches: the share is above 0, and below 1.
    assert all(0 < row["between_batches_share"] < 1 for row in result["results"].values())
