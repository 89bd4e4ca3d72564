import json
import os

import pytest
import torch

import sdrpn
from attention_samples import make_attention_inputs
from rpn_samples import make_rpn_inputs
from sdrpn.cli import build_parser, main
from sdrpn.labels.demo import region_iou
from sdrpn.labels.synthetic_maps import make_synthetic_maps


def test_build_info():
    info = sdrpn.build_info()
    assert info["version"] == sdrpn.__version__
    assert isinstance(info["with_cuda"], bool)
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]


@pytest.mark.skipif(not torch.backends.openmp.is_available(), reason="this torch has no OpenMP")
def test_cpu_kernels_are_built_with_openmp():
    # Built without it, at::parallel_for runs every CPU kernel on one thread.
    assert sdrpn.build_info()["with_openmp"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("contiguous", [True, False])
def test_sinks_vector_path_matches_float64_sums(dtype, contiguous):
    # Contiguous float32/16/bf16 rows take the AVX2 path (odd D exercises its tail).
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(3, 40, 523, generator=gen).to(dtype)
    h[:, ::7, 11] = 60.0
    if not contiguous:
        h = h.transpose(1, 2).contiguous().transpose(1, 2)
    rms = h.double().pow(2).mean(-1).add(1e-6).sqrt()
    expected = h.double()[..., 11].abs() > 20.0 * rms
    assert torch.equal(sdrpn.ops.massive_activation_sinks(h, [11]), expected)


def test_ops_are_registered():
    assert hasattr(torch.ops.sdrpn, "pseudo_labels")
    assert hasattr(torch.ops.sdrpn, "massive_activation_sinks")


def test_fake_kernels_check_devices_as_the_kernels_do():
    """A meta tensor among real ones dispatches to the fake kernel: it refuses the mix as
    the real kernels refuse CPU with CUDA, instead of returning uninitialised memory."""
    attention = make_attention_inputs()
    a = attention.args()
    with pytest.raises(RuntimeError, match=r"key must be on the device of query \(cpu\), got meta"):
        sdrpn.ops.attention_rows(a[0], a[1].to("meta"), *a[2:])
    with pytest.raises(RuntimeError, match=r"sink must be on the device of grounding \(cpu\), got meta"):
        sdrpn.ops.pseudo_labels(torch.rand(2, 24), torch.rand(2, 24, device="meta"), 4, 6)
    args, kwargs = make_rpn_inputs()
    with pytest.raises(RuntimeError, match=r"q_weight must be on the device of query_states \(cpu\), got meta"):
        sdrpn.ops.rpn_scores(args[0], args[1], args[2].to("meta"), *args[3:], **kwargs)
    meta = sdrpn.ops.pseudo_labels(torch.rand(2, 24, device="meta"), torch.rand(2, 24, device="meta"), 4, 6)
    assert meta.device.type == "meta" and meta.shape == (2, 24)


def test_synthetic_maps_are_normalised_with_sinks():
    maps = make_synthetic_maps(5, 6, 10, num_sinks=2, seed=1)
    assert maps.grounding.shape == (5, 60)
    torch.testing.assert_close(maps.grounding.sum(1), torch.ones(5))
    assert torch.equal((maps.sink >= 1e-3).sum(1), torch.full((5,), 2))
    r0, c0, r1, c1 = maps.regions.unbind(1)
    assert ((r0 >= 0) & (r1 <= 6) & (r0 < r1) & (c0 >= 0) & (c1 <= 10) & (c0 < c1)).all()
    for h, w in ((1, 1), (1, 2)):  # fewer cells than sinks: every cell is one (it had raised)
        tiny = make_synthetic_maps(2, h, w, seed=1)
        assert torch.equal((tiny.sink >= 1e-3).sum(1), torch.full((2,), h * w))


def test_region_iou():
    labels = torch.full((1, 16), -100)
    labels[0, [5, 6]] = 1
    assert float(region_iou(labels, torch.tensor([[1, 1, 2, 3]]), 4, 4)[0]) == 1.0
    assert float(region_iou(labels, torch.tensor([[1, 1, 2, 2]]), 4, 4)[0]) == 0.5


def test_label_demo_writes_outputs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["label-demo", "--out", str(out), "--batch", "6", "--grid", "12x20"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("labelled 6 maps (12x20)")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 6
    assert summary["with_signal"] + summary["all_ignore"] == 6
    # The planted regions must be found: the labels are what the whole method stands on.
    assert summary["mean_fg_iou_with_region"] > 0.5
    png = out / "labels_grid.png"
    assert png.stat().st_size > 0
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]
    # Sizes it cannot draw (an 80 GB allocation, a storage size that overflowed) are refused.
    for flags in (["--grid", "100000x100000"], ["--batch", str(2**63 - 1), "--grid", "4x4"]):
        with pytest.raises(ValueError, match="label-demo draws at most 200000 cells, got --batch"):
            main(["label-demo", "--out", str(tmp_path / "big"), *flags])


def test_an_out_that_is_a_file_is_named(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    for argv in (["label-demo", "--out", str(afile)], ["viz-labels", "l", "--out", str(afile)]):
        with pytest.raises(ValueError, match=f"--out {afile} is a file: it must be a folder"):
            main(argv)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["label-demo", "--grid", "24"], "--grid must look like 24x24"),
        (["label-demo", "--grid", "0x4"], "--grid must be at least 1x1"),
        (["label-demo", "--batch", "0"], "must be >= 1, got 0"),
        # Counts and seeds past 64 bits failed inside torch or pybind11.
        (["label-demo", "--batch", str(2**63)], f"must be at most {2**63 - 1} (64 bits), got {2**63}"),
        (["label-demo", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
        (["convert-labels", "a.pkl", "out", "--seed", str(2**64)], "argument --seed: must be at most"),
        # An empty path names the current folder: shards and summaries landed there.
        (["label-demo", "--out", ""], "argument --out: must not be empty, got ''"),
        (["convert-labels", "a.pkl", " "], "argument out: must not be empty, got ' '"),
        (["label", "--model", "m", "--data", "d", "--image-folder", "i", "--out", ""], "argument --out: must not"),
        (["train", "--model", "m", "--labels", "l", "--out", ""], "argument --out: must not be empty"),
        (["infer", "--model", "m", "--rpn", "", "--image", "x"], "argument --rpn: must not be empty"),
        (["viz-labels", "l", "--out", "o", "--image-folder", ""], "argument --image-folder: must not be empty"),
    ],
)
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    # One line, as every other mistake is (argparse printed its usage block first).
    assert message in err and len(err.strip().splitlines()) == 1 and err.endswith("(--help lists the flags)\n")


def test_count_flags_take_64_bit_ints_from_their_minimum():
    import argparse

    from sdrpn.cli import INT64_MAX, non_negative_int, positive_int

    assert (positive_int("1"), non_negative_int("0"), positive_int(str(INT64_MAX))) == (1, 0, INT64_MAX)
    for parse, text in ((positive_int, "0"), (non_negative_int, "-1"), (positive_int, str(INT64_MAX + 1))):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_the_command_sets_up_its_logging_first(monkeypatch):
    import sdrpn.cli

    called = []
    monkeypatch.setattr(sdrpn.cli, "configure_logging", lambda: called.append(1))
    with pytest.raises(SystemExit):
        main(["--help"])
    assert called == [1]


@pytest.mark.parametrize(
    "device,message",
    [
        ("foo", "not a torch device: 'foo'"),
        ("cuda:64", "'cuda:64': this machine has"),
        ("cpu", None),
    ],
)
def test_device_flags_are_checked_up_front(device, message, capsys):
    for command in (["label-demo"], ["infer", "--model", "m", "--rpn", "r"]):
        if message is None:
            assert build_parser().parse_args([*command, "--device", device]).device == device
            continue
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([*command, "--device", device])
        assert exit_.value.code == 2 and f"argument --device: {message}" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_a_gpu_is_a_flag_error(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["label-demo", "--device", "cuda"])
    assert "argument --device: 'cuda': this machine has no cuda device" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command,hint",
    [("label", "rerun the same command to go on"), ("train", "rerun with --resume"), ("viz-labels", None)],
)
def test_ctrl_c_is_one_line_saying_what_was_kept(command, hint, capsys):
    from sdrpn.cli import run_command

    def interrupted(argv):
        raise KeyboardInterrupt

    assert run_command(interrupted, "sdrpn", [command, "--out", "x"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sdrpn {command}: interrupted") and len(err.splitlines()) == 1
    assert (hint in err) if hint else err == f"sdrpn {command}: interrupted"
    with pytest.raises(KeyboardInterrupt):
        run_command(interrupted, "sdrpn", [command, "--debug"])


def test_a_full_disk_under_safetensors_is_one_line(capsys):
    from safetensors import SafetensorError

    from sdrpn.cli import run_command

    def disk_full(argv):  # what save_file raises on ENOSPC: not an OSError
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    assert run_command(disk_full, "sdrpn", ["train"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdrpn train: error: Error while serializing") and len(err.splitlines()) == 1


def test_synth_command_reports_user_mistakes_in_one_line(tmp_path, capsys):
    from sdrpn.synth.cli import entry

    assert entry(["eval-base", "--model", str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdrpn-synth eval-base: error: ") and "nowhere" in err and len(err.splitlines()) == 1


def test_help_states_each_default_once():
    import re

    parser = build_parser()
    for command in ("label", "train", "infer"):
        text = parser._subparsers._group_actions[0].choices[command].format_help()
        assert not re.search(r"\(default: [^)]*\)\s+\(default:", text), command


def test_paths_on_the_command_line_take_a_leading_tilde_as_home(monkeypatch, tmp_path, capsys):
    # The shell leaves "~" alone after "--flag=" and in quotes: a folder named "~" would be made.
    from sdrpn.cli import path_arg

    monkeypatch.setenv("HOME", "/home/u")
    parser = build_parser()
    args = parser.parse_args(["train", "--model", "m", "--labels=~/l", "--out=~/o", "--image-folder", "~/i"])
    assert (args.labels, args.out, args.image_folder) == ("/home/u/l", "/home/u/o", "/home/u/i")
    args = parser.parse_args(["infer", "--model=~/m", "--rpn=~/r", "--data=~/d", "--image-folder=~/i", "--out=~/o"])
    assert (args.rpn, args.data, args.image_folder, args.out) == ("/home/u/r", "/home/u/d", "/home/u/i", "/home/u/o")
    assert args.model == "~/m"  # a folder or a Hub id: the loader tells which, and expands a folder's
    assert parser.parse_args(["viz-labels", "x~", "--out", "~"]).out == "/home/u"
    from sdrpn.synth.cli import build_parser as synth_parser

    files = {"data", "image_folder", "out", "labels", "rpn", "image", "viz", "pickle", "src", "preset"}
    files |= {"init", "to", "json"}
    for commands in (parser, synth_parser()):
        for command, sub in commands._subparsers._group_actions[0].choices.items():
            for action in sub._actions:
                takes_value = action.nargs != 0  # not a switch such as infer --json
                assert action.dest not in files or not takes_value or action.type is path_arg, (command, action.dest)
    args = synth_parser().parse_args(["eval-base", "--model=~/b", "--json=~/j"])
    assert (args.model, args.json) == ("/home/u/b", "/home/u/j")  # a synth model is a folder
    from sdrpn.integrations.paper import main as paper

    monkeypatch.chdir(tmp_path)
    assert paper(["table", "~/nowhere", "--out=~/t.md"]) != 0 and not (tmp_path / "~").exists()
    # Text that is no file keeps its "~".
    args = parser.parse_args(["infer", "--model", "m", "--rpn", "r", "--image", "i", "--question", "~/q",
                              "--prompt-template", "~{question}"])  # fmt: skip
    assert (args.question, args.prompt_template) == ("~/q", "~{question}")
    assert parser.parse_args(["convert-labels", "p", "o", "--strip-prefix", "~/data"]).strip_prefix == "~/data"
    label = ["label", "--model", "m", "--data", "~/d", "--image-folder", "i", "--out", "o"]
    args = parser.parse_args(label + ["--prompt-template", "~/<image> {question}"])  # an option field, not a path
    assert args.data == "/home/u/d" and args.prompt_template == "~/<image> {question}"


def test_setting_changes_name_each_value_nested_and_long():
    from sdrpn.options import setting_changes

    old = {"lr": 1e-4, "roi": {"threshold": 0.15, "sigma": 1.0}, "data": "/a/" + "x" * 100 + "/one.json", "same": 1}
    new = {"lr": 2e-4, "roi": {"threshold": 0.3, "sigma": 1.0}, "data": "/a/" + "x" * 100 + "/two.json", "same": 1}
    data, lr, roi = setting_changes(old, new)
    assert lr == "lr: 0.0001 -> 0.0002" and roi == "roi.threshold: 0.15 -> 0.3"
    assert data.startswith('data: "/a/xxx') and '/one.json" -> "/a/' in data and data.endswith('x/two.json"')
    assert "..." in data and len(data) < 180
    assert setting_changes({"a": None}, {"b": 2}) == ["a: null -> (absent)", "b: (absent) -> 2"]
    from sdrpn.options import shortened

    assert [len(shortened("x" * 100, n)) for n in (0, 2, 3, 4, 9, 80)] == [0, 2, 3, 4, 9, 80]
    assert shortened("abcdefghij", 9) == "abc...hij" and shortened("abcdefghij", 8) == "ab...hij"
    assert shortened("abcdefghi", 9) == "abcdefghi" and shortened("abcdef", 3) == "abc"
    assert shortened("abcdefghij", 4) == "...j"  # room for the cut and one character
    # A group of settings on one side only (an artefact from before it was recorded) is one change.
    assert setting_changes({"roi": {"sigma": 1.0}}, {}) == ['roi: {"sigma": 1.0} -> (absent)']
    assert setting_changes({"roi": None}, {"roi": {"sigma": 1.0}}) == ['roi: null -> {"sigma": 1.0}']
    # A note says what a top-level change means; a nested setting of the same name gets none.
    notes = {"sha": "data holds other content"}
    noted = setting_changes({"sha": "1", "x": {"sha": "1"}}, {"sha": "2", "x": {"sha": "2"}}, notes)
    assert noted == ['sha: "1" -> "2" (data holds other content)', 'x.sha: "1" -> "2"']


def test_paths_that_changed_are_moves_not_changes():
    from sdrpn.options import changes_and_moves

    old = {"data": "/a/d.json", "sha": "1", "images": "/a/img", "lr": 1.0, "out": "/a/run"}
    new = {"data": "/b/d.json", "sha": "1", "images": "/b/img", "lr": 2.0}
    changes, moves = changes_and_moves(old, new, ("data", "images", "out"))
    assert changes == ["lr: 1.0 -> 2.0"]
    # A path on one side only is neither: its job records it since a later version.
    assert moves == ['data: "/a/d.json" -> "/b/d.json"', 'images: "/a/img" -> "/b/img"']
    assert changes_and_moves(old, {**old, "sha": "2"}, ("data",)) == (['sha: "1" -> "2"'], [])
    assert changes_and_moves({"lr": 1.0}, {"lr": 1.0, "data": "/b/d.json"}, ("data",)) == ([], [])
    # A path whose content has a digest is set apart where the digest is recorded; its change
    # is named as the file's. A record from before the digest compares the path instead.
    old.pop("out")
    moved = {**new, "lr": 1.0}
    assert changes_and_moves(old, moved, ("images",), {"data": "sha"}) == ([], moves)
    changed = changes_and_moves(old, {**moved, "sha": "2"}, (), {"data": "sha"})
    assert changed == (['images: "/a/img" -> "/b/img"', 'sha: "1" -> "2" (data holds other content)'], [moves[0]])
    for before in ({k: v for k, v in old.items() if k != "sha"}, {**old, "sha": None}):
        assert changes_and_moves(before, moved, ("images",), {"data": "sha"}) == ([moves[0]], [moves[1]])


def test_model_names_are_one_model_where_they_are_one_folder(tmp_path, monkeypatch):
    from sdrpn.llava.model_facts import same_model_name

    (tmp_path / "m").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "m")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    folder = str(tmp_path / "m")
    for name in (folder, folder + "/", "m", "./m", "~/m", "~/link"):
        assert same_model_name(folder, name) and same_model_name(name, folder), name
    # A file is no model folder, even where two names lead to it.
    (tmp_path / "weights.bin").write_text("")
    (tmp_path / "link.bin").symlink_to(tmp_path / "weights.bin")
    assert not same_model_name(str(tmp_path / "weights.bin"), str(tmp_path / "link.bin"))
    # Hub ids, and folders that do not exist, are compared as written.
    assert same_model_name("org/m", "org/m") and not same_model_name("org/m", "org/m/")
    assert not same_model_name("~/gone", str(tmp_path / "gone")) and not same_model_name(folder, None)


def test_roi_options_take_the_ends_of_their_ranges():
    # min_area 0 grows nothing, max_area 1 keeps one-cell boxes only, a max_boxes of the
    # 64-bit maximum limits nothing (the ops take it); one step past each end is refused.
    from sdrpn.options import RoiOptions

    edges = RoiOptions(threshold=-1.0, min_area=0, max_area=1, max_boxes=2**63 - 1, drop_singletons=False)
    assert (edges.min_area, edges.max_area, edges.max_boxes) == (0, 1, 2**63 - 1)
    assert RoiOptions(threshold=1.0, max_boxes=1).threshold == 1.0
    for change, message in (
        (dict(min_area=-1), "min_area must be >= 0, got -1"),
        (dict(max_area=0), "max_area must be >= 1, got 0"),
        (dict(max_boxes=0), "max_boxes must be >= 1, got 0"),
        (dict(max_boxes=2**63), "max_boxes must fit in 64 bits"),
        (dict(threshold=1.01), r"threshold must lie in \[-1, 1\], got 1.01"),
    ):
        with pytest.raises(ValueError, match=message):
            RoiOptions(**change)


def test_an_optional_count_is_checked_once_it_is_set():
    """None stands for a count left unset (no --limit); a value that is set is held to the
    rule of a required one."""
    from types import SimpleNamespace

    from sdrpn.options import require_at_least

    unset, zero, half = SimpleNamespace(limit=None), SimpleNamespace(limit=0), SimpleNamespace(limit=2.5)
    require_at_least(1, unset, "limit", optional=True)
    with pytest.raises(ValueError, match="limit must be an int >= 1, got None"):
        require_at_least(1, unset, "limit")
    with pytest.raises(ValueError, match="limit must be >= 1, got 0"):
        require_at_least(1, zero, "limit", optional=True)
    with pytest.raises(ValueError, match="limit must be an int >= 1, got 2.5"):
        require_at_least(1, half, "limit", optional=True)


def test_option_errors_name_the_flag(tmp_path, capsys):
    from sdrpn.cli import entry

    args = ["label", "--model", "m", "--data", "d.json", "--image-folder", str(tmp_path), "--out", str(tmp_path / "o")]
    assert entry([*args, "--max-new-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert "error: argument --max-new-tokens: max_new_tokens must be >= 1, got 0" in err
    infer = ["infer", "--model", "m", "--rpn", "r", "--image", "x.png", "--question", "q"]
    assert entry([*infer, "--sigma", "-1"]) == 2
    assert "error: argument --sigma: sigma must be > 0, got -1.0" in capsys.readouterr().err
