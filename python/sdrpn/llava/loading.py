"""Loading a LLaVA checkpoint (weights, config, tokenizer) from a local folder or a Hub id."""

from __future__ import annotations

import logging
import os

from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from transformers import AutoTokenizer, LlavaForConditionalGeneration, PreTrainedTokenizerBase

from .model_facts import is_local_folder, parse_dtype

log = logging.getLogger(__name__)


class ModelNotFoundError(FileNotFoundError):
    """A model or RPN named by something that is neither a local folder nor a Hub id this
    machine can load; the message says what was tried."""


def _causes(error: BaseException | None):
    """The error and the ones it was raised from (transformers wraps the Hub's errors)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _hub_reason(error: BaseException, cache: str, revision: str | None, offline: bool) -> str | None:
    """Why a Hub id could not be used, read from the Hub client's error types; None for an
    error that is not about finding the model (a broken file, a full disk)."""
    for e in _causes(error):
        if isinstance(e, GatedRepoError):
            return "it is a gated model: accept its terms on the Hub and log in (`hf auth login`)"
        if isinstance(e, RepositoryNotFoundError):
            return "the Hub has no such model (or it is private: log in with `hf auth login`)"
        if isinstance(e, RevisionNotFoundError):
            return f"the Hub model has no revision {revision!r}"
        if isinstance(e, RemoteEntryNotFoundError):
            return f"the Hub model lacks a file: {e}"
        if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError)):
            if offline:
                return (
                    f"its files are not in the local Hub cache ({cache}), and offline mode (HF_HUB_OFFLINE=1) keeps "
                    f"the Hub from being asked"
                )
            return (
                f"its files are not in the local Hub cache ({cache}), and the Hub could not be reached: this machine "
                f"may be offline (set HF_HUB_OFFLINE=1 to use the cache alone)"
            )
    return None


def model_not_found(
    name: str,
    what: str,
    error: BaseException,
    *,
    cache_dir: str | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
) -> ModelNotFoundError | None:
    """One error for a name that is neither a local folder nor a usable Hub id, saying what
    was tried and how to get the files; None when `error` is about something else."""
    folder = os.path.abspath(os.path.expanduser(name))
    tried = f"{what} {name!r} not found. Tried the local directory {folder}: it does not exist."
    if any(isinstance(e, HFValidationError) for e in _causes(error)):
        return ModelNotFoundError(f"{tried} {name!r} is not a Hugging Face Hub id (owner/name) either.")
    cache = os.path.expanduser(str(cache_dir or hub_constants.HF_HUB_CACHE))
    reason = _hub_reason(error, cache, revision, offline=hub_constants.HF_HUB_OFFLINE or local_files_only)
    if reason is None:
        return None
    return ModelNotFoundError(
        f"{tried} Tried the Hugging Face Hub id {name!r}: {reason}. Pass a local directory, or download it "
        f"where there is network (`hf download {name}`) into the Hub cache this machine reads."
    )


def _refuse_a_file(name: str, what: str) -> None:
    """A name that is no local folder but exists is a file where its folder was meant, not a
    Hub id: said so, rather than "not found" after a Hub lookup."""
    if os.path.exists(os.path.expanduser(name)):
        raise ValueError(f"{name} is a file: give the {what}'s folder or its Hub id")


def _as_hub_id(name: str, what: str, local_files_only: bool = False) -> None:
    """Checks `name` as a Hub id and says it is read as one: without a network the Hub
    client retries for up to a minute before the not-found error, and a mistyped local
    folder would otherwise look like a hang."""
    validate_repo_id(name)
    if not (hub_constants.HF_HUB_OFFLINE or local_files_only):
        log.info(
            "reading %s %r as a Hugging Face Hub id, no local folder having that name (HF_HUB_OFFLINE=1 reads the "
            "local cache alone, at once)",
            what,
            name,
        )


def hub_folder(
    name: str,
    filenames: tuple[str, ...],
    what: str,
    *,
    optional: tuple[str, ...] = (),
    revision: str | None = None,
    cache_dir: str | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> str:
    """The local folder holding `filenames` (and those of `optional` that exist) of `name`:
    the folder itself when it is a local directory, else the Hub snapshot they were fetched
    into (from the cache alone when offline: huggingface_hub honours HF_HUB_OFFLINE)."""
    if is_local_folder(name):
        return os.path.expanduser(name)
    _refuse_a_file(name, what)
    hub = dict(
        revision=revision,
        cache_dir=cache_dir,
        force_download=force_download,
        local_files_only=local_files_only,
        token=token,
    )
    try:
        _as_hub_id(name, what, local_files_only)
        paths = [hf_hub_download(name, f, **hub) for f in filenames]
    except (HFValidationError, EntryNotFoundError, OSError) as e:
        error = model_not_found(
            name, what, e, cache_dir=cache_dir, revision=revision, local_files_only=local_files_only
        )
        if error is None:
            raise
        raise error from e
    for f in optional:
        try:
            hf_hub_download(name, f, **hub)
        except EntryNotFoundError:
            pass
    # The files of one revision share its snapshot folder.
    return os.path.dirname(paths[0])


def load_llava(
    model_dir: str, dtype: str = "bf16", device: str = "cpu"
) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerBase]:
    """A frozen LlavaForConditionalGeneration in eval mode on SDPA attention, and its tokenizer.

    `model_dir` is a local folder or a Hub id; a Hub id is read from the local Hub cache, and
    fetched from the Hub where it is missing there and the machine is online (not with
    HF_HUB_OFFLINE=1). Raises ModelNotFoundError, saying what it tried, when neither works.
    """
    local = is_local_folder(model_dir)
    name = os.path.expanduser(model_dir) if local else model_dir
    if not local:
        _refuse_a_file(model_dir, "model")
    try:
        if not local:
            _as_hub_id(name, "base model")
        model = LlavaForConditionalGeneration.from_pretrained(
            name, dtype=parse_dtype(dtype), attn_implementation="sdpa", local_files_only=local
        )
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local)
    except (HFValidationError, OSError) as e:
        # A local folder's own error (a missing or broken file) says more than ours would.
        error = None if local else model_not_found(model_dir, "base model", e)
        if error is None:
            raise
        raise error from e
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer
