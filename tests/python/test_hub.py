"""RPN folders through huggingface_hub's mixin (save_pretrained / from_pretrained / push_to_hub),
Hub ids read offline from a Hub cache laid out by the test, the model card, and the error for
a model that is neither a local folder nor a usable Hub id. Nothing here reaches the network."""

import json
import logging
import os
import shutil
import subprocess
import sys

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import load_file, save_file

import sdrpn.llava.loading
from sdrpn.llava.loading import ModelNotFoundError, load_llava, model_not_found
from sdrpn.rpn.card import GENERATED_MARK
from sdrpn.rpn.model import RegionProposalNetwork
from sdrpn.rpn.train import RPNTrainer
from sdrpn.rpn.train_config import TrainConfig
from synthetic_labels import write_region_labels
from tiny_llava import make_tiny_llava, make_tokenizer, save_tiny_llava

K, T = 1, 3
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_llava(num_layers=4)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hub cache and offline mode. huggingface_hub reads both from the environment
    once, at import: its constants are patched for this process, the environment for any
    child process."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def put_in_cache(cache, repo_id: str, folder) -> None:
    """Lay out `folder` as the cached main revision of model `repo_id`, as a download would."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)


def trained_like(tiny, **kwargs) -> RegionProposalNetwork:
    rpn = RegionProposalNetwork.from_llava(tiny.model, K, T, preset="tiny", **kwargs)
    with torch.no_grad():
        rpn.q_proj.weight.add_(0.5)  # differs from a fresh copy of the backbone
    return rpn


def assert_same_weights(a: RegionProposalNetwork, b: RegionProposalNetwork) -> None:
    sa, sb = a.trainable_state_dict(), b.trainable_state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_save_pretrained_round_trip(tiny, tmp_path):
    rpn = trained_like(tiny)
    rpn.save_pretrained(tmp_path / "rpn")
    assert sorted(os.listdir(tmp_path / "rpn")) == ["README.md", "config.json", "rpn.safetensors", "rpn_config.json"]
    # config.json, the file the mixin and the Hub look for, holds the recorded settings.
    hub_config = json.loads((tmp_path / "rpn" / "config.json").read_text())
    assert hub_config == json.loads((tmp_path / "rpn" / "rpn_config.json").read_text()) == rpn.config.to_dict()
    loaded = RegionProposalNetwork.from_pretrained(tmp_path / "rpn", model=tiny.model)
    assert_same_weights(rpn, loaded)
    assert loaded.config == rpn.config


def test_load_and_from_pretrained_read_each_others_folders(tiny, tmp_path):
    rpn = trained_like(tiny)
    rpn.save_pretrained(str(tmp_path / "pretrained"))
    assert_same_weights(rpn, RegionProposalNetwork.load(str(tmp_path / "pretrained"), tiny.model))
    rpn.save(str(tmp_path / "saved"))  # the weights and rpn_config.json alone, as training checkpoints are
    assert sorted(os.listdir(tmp_path / "saved")) == ["rpn.safetensors", "rpn_config.json"]
    assert_same_weights(rpn, RegionProposalNetwork.from_pretrained(str(tmp_path / "saved"), model=tiny.model))

    # save into a save_pretrained folder keeps its config.json in step.
    with torch.no_grad():
        rpn.k_proj.weight.add_(1.0)
    rpn.config.preset = "retrained"
    rpn.save(str(tmp_path / "pretrained"))
    loaded = RegionProposalNetwork.from_pretrained(str(tmp_path / "pretrained"), model=tiny.model)
    assert_same_weights(rpn, loaded)
    assert json.loads((tmp_path / "pretrained" / "config.json").read_text())["preset"] == "retrained"


def test_from_pretrained_keeps_the_checks_of_load(tiny, tmp_path):
    folder = tmp_path / "rpn"
    trained_like(tiny).save_pretrained(folder)
    with pytest.raises(ValueError, match="was trained on another base model"):
        RegionProposalNetwork.from_pretrained(folder, model=make_tiny_llava(num_layers=4, seed=1).model)

    hub_config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hub_config, "depth": 2}))
    with pytest.raises(ValueError, match=r"disagree on \['depth'\].*make them equal"):
        RegionProposalNetwork.from_pretrained(folder, model=tiny.model)
    (folder / "config.json").write_text(json.dumps({**hub_config, "colour": "red"}))
    with pytest.raises(ValueError, match=r"unknown fields \['colour'\]"):
        RegionProposalNetwork.from_pretrained(folder, model=tiny.model)
    (folder / "config.json").write_text(json.dumps(hub_config))

    weights = load_file(folder / "rpn.safetensors")
    weights["q_proj.weight"][0, 0] = float("nan")
    save_file(weights, folder / "rpn.safetensors")
    with pytest.raises(ValueError, match="NaN or Inf"):
        RegionProposalNetwork.from_pretrained(folder, model=tiny.model)

    with pytest.raises(FileNotFoundError, match="is not an RPN folder: it has no rpn_config.json"):
        RegionProposalNetwork.from_pretrained(tmp_path, model=tiny.model)
    # A file where the folder was meant had been reported as "it does not exist".
    with pytest.raises(ValueError, match="rpn.safetensors is a file: give the RPN's folder or its Hub id"):
        RegionProposalNetwork.from_pretrained(folder / "rpn.safetensors", model=tiny.model)
    # A config of null had read as every default, and a branch the model lacks was not traced to it.
    config_path = folder / "rpn_config.json"
    kept = config_path.read_text()
    config_path.write_text("null")
    with pytest.raises(ValueError, match="rpn_config.json: RPNConfig must be a JSON object, got null"):
        RegionProposalNetwork.from_pretrained(folder, model=tiny.model)
    config_path.write_text(json.dumps({**json.loads(kept), "branch_layer": 15}))
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match=f"the RPN in {folder} \\(rpn_config.json\\): .*K \\+ depth"):
        RegionProposalNetwork.from_pretrained(folder, model=tiny.model)


def test_hub_ids_load_offline_from_the_hub_cache(tmp_path, offline_cache):
    # The base model and its RPN, both by Hub id, from a cache and nothing else.
    tiny = save_tiny_llava(str(tmp_path / "base"), num_layers=4)
    put_in_cache(offline_cache, "org/tiny-llava", tmp_path / "base")
    model, tokenizer = load_llava("org/tiny-llava", "fp32")
    assert model.config._name_or_path == "org/tiny-llava" and tokenizer.pad_token_id == 0
    rpn = trained_like(tiny)
    rpn.save_pretrained(tmp_path / "rpn")
    put_in_cache(offline_cache, "org/tiny-rpn", tmp_path / "rpn")
    assert_same_weights(rpn, RegionProposalNetwork.from_pretrained("org/tiny-rpn", model=model))
    pinned = RegionProposalNetwork.from_pretrained("org/tiny-rpn", model=model, revision=REVISION)
    assert_same_weights(rpn, pinned)

    # A cache named by argument rather than by the environment.
    other = tmp_path / "other-cache"
    other.mkdir()
    put_in_cache(other, "org/elsewhere", tmp_path / "rpn")
    assert_same_weights(rpn, RegionProposalNetwork.from_pretrained("org/elsewhere", model=model, cache_dir=other))


def test_a_missing_model_says_what_was_tried(tiny, tmp_path, offline_cache, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="sdrpn")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as err:
        load_llava("org/missing", "fp32")
    message = str(err.value)
    assert f"base model 'org/missing' not found. Tried the local directory {tmp_path / 'org' / 'missing'}" in message
    assert "Tried the Hugging Face Hub id 'org/missing'" in message
    assert f"its files are not in the local Hub cache ({offline_cache})" in message and "HF_HUB_OFFLINE=1" in message

    with pytest.raises(ModelNotFoundError, match=r"RPN 'org/missing-rpn' not found\. .*HF_HUB_OFFLINE=1"):
        RegionProposalNetwork.from_pretrained("org/missing-rpn", model=tiny.model)
    with pytest.raises(ModelNotFoundError, match="not a Hugging Face Hub id .* either"):
        load_llava(str(tmp_path / "no" / "such" / "dir"), "fp32")
    with pytest.raises(ModelNotFoundError, match="not a Hugging Face Hub id .* either"):
        RegionProposalNetwork.from_pretrained("./no-such-rpn", model=tiny.model)
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="afile is a file: give the model's folder or its Hub id"):
        load_llava("afile", "fp32")

    assert "as a Hugging Face Hub id" not in caplog.text  # offline the cache answers at once

    # Online, a Hub that cannot be reached ends in the same missing cache entry, after the
    # Hub client's retries: a line says first that the name is read as a Hub id.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("no connection")

    monkeypatch.setattr(sdrpn.llava.loading, "hf_hub_download", unreachable)
    with pytest.raises(ModelNotFoundError, match="the Hub could not be reached"):
        RegionProposalNetwork.from_pretrained("org/typo-rpn", model=tiny.model)
    assert "reading RPN 'org/typo-rpn' as a Hugging Face Hub id, no local folder having that name" in caplog.text
    online = model_not_found("org/missing", "base model", LocalEntryNotFoundError("no connection"))
    assert "the Hub could not be reached: this machine may be offline" in str(online)
    assert "set HF_HUB_OFFLINE=1" in str(online)
    # An error that is not about finding the model is left as it was raised.
    assert model_not_found("org/missing", "base model", OSError("disk full")) is None


def test_a_local_folder_keeps_its_own_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError) as err:
        load_llava(str(tmp_path / "empty"), "fp32")
    assert not isinstance(err.value, ModelNotFoundError)


def test_model_card(tiny, tmp_path):
    rpn = trained_like(tiny, preprocessing="crop")
    rpn.config.base_model = "llava-hf/llava-1.5-7b-hf"
    metrics = {"bce": 0.1234567, "iou": 0.75, "epoch": 3}
    rpn.save_pretrained(tmp_path / "rpn", model_card_kwargs={"metrics": metrics, "training": {"lr": 5e-05}})
    card = ModelCard.load(tmp_path / "rpn" / "README.md")
    assert card.data.library_name == "sdrpn" and card.data.base_model == "llava-hf/llava-1.5-7b-hf"
    assert {"sdrpn", "pytorch_model_hub_mixin"} <= set(card.data.tags)
    text = card.text
    assert "SD-RPN region proposal network for llava-hf/llava-1.5-7b-hf" in text
    assert f"| architecture fingerprint | `{rpn.config.base_config_fingerprint}` |" in text
    assert "| image preprocessing | `crop` |" in text and "| preset | `tiny` |" in text
    assert "{question} ASSISTANT:" in text and "threshold=0.15" in text
    assert "## Training" in text and "| lr | `5e-05` |" in text
    assert "## Held-out metrics" in text and "| bce | `0.1235` |" in text and "| iou | `0.75` |" in text
    assert "decoder layer 1, runs copies of layers 1..3" in text

    rpn.config.base_model = str(tmp_path / "models" / "llava-local") + "/"
    text = rpn.generate_model_card().text
    assert "# SD-RPN region proposal network for llava-local\n" in text  # the path stays in the table
    assert f"| base model | `{tmp_path}/models/llava-local/` |" in text
    assert rpn.generate_model_card().data.base_model is None  # a path is no Hub id for the metadata

    # A re-save describes the new weights; without metrics there is no metrics section.
    rpn.save_pretrained(tmp_path / "rpn")
    assert "## Held-out metrics" not in (tmp_path / "rpn" / "README.md").read_text()
    # A card written by hand is the user's: kept.
    (tmp_path / "rpn" / "README.md").write_text("my own card\n")
    rpn.save_pretrained(tmp_path / "rpn")
    assert (tmp_path / "rpn" / "README.md").read_text() == "my own card\n"

    # A base model given as a local path is named in the text, not as Hub metadata.
    rpn.config.base_model = str(tmp_path / "base")
    rpn.save_pretrained(tmp_path / "local")
    card = ModelCard.load(tmp_path / "local" / "README.md")
    assert card.data.base_model is None and str(tmp_path / "base") in card.text
    assert GENERATED_MARK in card.text


def test_push_to_hub_uploads_a_loadable_folder(tiny, tmp_path, monkeypatch):
    pushed = tmp_path / "pushed"

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            shutil.copytree(folder_path, pushed)
            return f"https://huggingface.co/{repo_id}/commit/{REVISION}"

    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", FakeApi)
    rpn = trained_like(tiny)
    url = rpn.push_to_hub("org/tiny-rpn", model_card_kwargs={"metrics": {"iou": 0.5}})
    assert url.startswith("https://huggingface.co/org/tiny-rpn")
    assert sorted(os.listdir(pushed)) == ["README.md", "config.json", "rpn.safetensors", "rpn_config.json"]
    assert "| iou | `0.5` |" in (pushed / "README.md").read_text()
    assert_same_weights(rpn, RegionProposalNetwork.from_pretrained(pushed, model=tiny.model))


def test_the_trainer_writes_a_card_with_its_settings_and_held_out_metrics(tmp_path):
    tiny = save_tiny_llava(str(tmp_path / "model"), grid=4, num_layers=4)
    write_region_labels(tmp_path / "labels", tmp_path / "images", num=32, grid=4, image_size=56)
    cfg = TrainConfig(
        labels=str(tmp_path / "labels"),
        out=str(tmp_path / "run"),
        branch_layer=1,
        depth=2,
        batch_size=8,
        effective_batch=8,
        held_out_fraction=0.25,
    )
    metrics = RPNTrainer(cfg, tiny.model, make_tokenizer()).run()
    text = (tmp_path / "run" / "README.md").read_text()
    assert "## Training" in text and "| labels | `labels` |" in text and "| effective_batch | `8` |" in text
    assert f"| iou | `{metrics['iou']:.4g}` |" in text and "| global_step |" in text
    assert str(tmp_path / "labels") not in text  # the label folder by its name, not its path here
    assert_same_weights(
        RegionProposalNetwork.load(str(tmp_path / "run"), tiny.model),
        RegionProposalNetwork.from_pretrained(tmp_path / "run", model=tiny.model),
    )


def test_the_command_lines_print_a_hub_warning_once():
    """huggingface_hub's loggers print through a handler of their own; under the commands'
    logging they printed each warning (a Hub retry without a network) a second time through
    the root's handler. It prints once, as the commands' own lines do; other libraries'
    INFO lines (numexpr's thread count) stay out."""
    code = (
        "import logging, sys; from sdrpn.cli import configure_logging; configure_logging(); "
        "import huggingface_hub.utils.logging; "  # where the Hub's handler comes from: after, as a command imports it
        "logging.getLogger('huggingface_hub.utils._http').warning('retrying in 1s'); "
        "logging.getLogger('sdrpn.x').info('ours'); logging.getLogger('numexpr.utils').info('NumExpr defaulting')"
    )
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert err.count("retrying in 1s") == 1, err
    assert "WARNING huggingface_hub.utils._http: retrying in 1s" in err and "INFO sdrpn.x: ours" in err, err
    assert "NumExpr" not in err, err
