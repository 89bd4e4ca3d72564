"""The Region Proposal Network on top of a frozen LLaVA decoder (SPEC Stage 2).

It reads the hidden states entering decoder layer K (the branch point) and runs
(T-1) decoder layers copied from layers K .. K+T-2, an RMSNorm copied from the final
norm, and a head made of the input RMSNorm, q_proj and k_proj of a copy of layer
K+T-1. The score of visual token i is mean over heads of q_h . k_{h,i} / sqrt(d), with q
from the last prompt token, no RoPE: ``sdrpn.ops.rpn_scores``.

An RPN folder holds rpn.safetensors and rpn_config.json (RPNConfig); ``save_pretrained``
adds config.json (the same settings: the file huggingface_hub's mixin and the Hub look for)
and a model card (README.md). ``load`` reads a local folder, ``from_pretrained`` a local
folder or a Hub id.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, PyTorchModelHubMixin
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers.masking_utils import create_causal_mask

from .. import ops
from ..io_utils import read_json_as, read_safetensors, write_atomic, write_json
from ..llava.attention_kernels import without_cudnn_attention
from ..llava.geometry import model_grid
from ..llava.inputs import PREPROCESSING_MODES, PROMPT_TEMPLATE, check_rpn_template, check_template
from ..llava.loading import hub_folder
from ..llava.model_facts import config_fingerprint, fingerprints_match, model_device, model_dtype, weights_fingerprint
from ..ops import IGNORE_INDEX
from ..options import TASK_THRESHOLDS, Options, RoiOptions, is_int
from .card import GENERATED_MARK, rpn_card
from .checkpoints import latest_checkpoint

WEIGHTS_NAME = "rpn.safetensors"
CONFIG_NAME = "rpn_config.json"
HUB_CONFIG_NAME = "config.json"
CARD_NAME = "README.md"


def non_finite_tensors(tensors: dict[str, Tensor]) -> list[str]:
    """The names of the floating tensors holding NaN or Inf, sorted; one read from the device.
    Meta tensors (a model built without weights, before they are loaded) hold no values."""
    names = sorted(k for k, v in tensors.items() if v.is_floating_point() and not v.is_meta)
    if not names:
        return []
    finite = [torch.isfinite(tensors[k]).all() for k in names]
    flags = torch.stack([f.to(finite[0].device) for f in finite]).tolist()
    return [k for k, ok in zip(names, flags) if not ok]


@dataclass
class RPNConfig(Options):
    """rpn_config.json: everything needed to use the RPN on its base model. Fields missing
    from folders written by earlier versions take these defaults (the reference's)."""

    branch_layer: int = 15  # K: the RPN reads hidden_states[K]
    depth: int = 3  # T: copies of layers K .. K+T-1
    preset: str | None = None  # name of the preset it was trained with
    base_model: str | None = None  # the base model's name or Hub id, as it was given
    base_config_fingerprint: str | None = None  # llava.model_facts.config_fingerprint
    grid: list[int] | None = None  # [grid_h, grid_w] of the base model's image tokens
    image_size: int | None = None  # the encoder's input side
    num_heads: int = 0
    hidden_size: int = 0
    # A few weights of the base model, to refuse loading the RPN onto another model.
    base_fingerprint: list[float] = field(default_factory=list)
    prompt_template: str = PROMPT_TEMPLATE  # the template its labels were made with
    preprocessing: str = "pad"  # the image preprocessing its labels were made with
    roi: dict = field(default_factory=lambda: RoiOptions().to_dict())  # recommended RoiOptions
    task_thresholds: dict = field(default_factory=lambda: dict(TASK_THRESHOLDS))  # per benchmark

    def __post_init__(self):
        self.check_types()
        check_template(self.prompt_template)
        if self.preprocessing not in PREPROCESSING_MODES:
            raise ValueError(f"preprocessing must be one of {PREPROCESSING_MODES}, got {self.preprocessing!r}")
        RoiOptions.from_dict(self.roi)
        for task, threshold in self.task_thresholds.items():
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1 <= threshold <= 1:
                raise ValueError(f"task_thresholds[{task!r}] must be a threshold in [-1, 1], got {threshold!r}")

    def base_model_problem(self, model: nn.Module) -> str | None:
        """How ``model`` differs from the base model this RPN was made on, for a message
        (None: it is that model, or one of its dtype). Copies of the base model's layers are
        part of the RPN, so on another model it would read states it was never trained on."""
        if self.hidden_size != model.get_decoder().config.hidden_size or self.base_config_fingerprint not in (
            None,
            config_fingerprint(model.config),
        ):
            return "another architecture"
        if fingerprints_match(self.base_fingerprint, weights_fingerprint(model, self.branch_layer - 1)):
            return None
        if self.base_config_fingerprint is None:  # an RPN folder of the first format
            return "other weights; the folder records no architecture"
        return "the same architecture, other weights"

    @property
    def roi_options(self) -> RoiOptions:
        return RoiOptions.from_dict(self.roi)

    def task_roi_options(self, task: str) -> RoiOptions:
        """The recommended options with the threshold of a named benchmark."""
        if task not in self.task_thresholds:
            raise ValueError(f"task must be one of {sorted(self.task_thresholds)}, got {task!r}")
        return self.roi_options.updated(threshold=self.task_thresholds[task])


def _config_object(value) -> RPNConfig:
    """An RPN folder's config: a JSON object (null would read as every default)."""
    if value is None:
        raise ValueError("RPNConfig must be a JSON object, got null")
    return RPNConfig.from_dict(value)


def _unfinished_run(folder: str) -> str:
    """Where `folder` is the --out of a training run that has not finished: what to pass."""
    try:
        checkpoint = latest_checkpoint(folder)
    except (OSError, ValueError):  # a damaged run: the plain refusal says enough
        return ""
    if checkpoint is None:
        return ""
    return (
        f" (it holds a training run that has not finished: resume it with sdrpn train --resume, or pass its "
        f"latest checkpoint, {checkpoint})"
    )


def read_rpn_config(folder: str) -> RPNConfig:
    """The RPNConfig of a folder. rpn_config.json is the RPN's own; config.json, where there
    is one, must say the same (folders written before it existed have none)."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} is not an RPN folder: it has no {CONFIG_NAME}{_unfinished_run(folder)}")
    config = read_json_as(path, _config_object)
    hub_path = os.path.join(folder, HUB_CONFIG_NAME)
    if os.path.isfile(hub_path):
        ours, theirs = config.to_dict(), read_json_as(hub_path, RPNConfig.from_dict).to_dict()
        differ = sorted(k for k in ours if ours[k] != theirs[k])
        if differ:
            raise ValueError(
                f"{CONFIG_NAME} and {HUB_CONFIG_NAME} in {folder} disagree on {differ}: {CONFIG_NAME} is the "
                f"RPN's config and {HUB_CONFIG_NAME} its copy for the Hub; make them equal, or remove "
                f"{HUB_CONFIG_NAME}"
            )
    return config


def rpn_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Binary cross-entropy with logits, mean over the cells whose label is not ignored.

    Exactly zero, and still part of the graph, when a batch has no such cell.
    """
    if not isinstance(logits, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(f"logits and labels must be tensors, got {type(logits).__name__} and {type(labels).__name__}")
    if logits.shape != labels.shape:
        raise ValueError(f"logits and labels must have one shape, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if not is_int(ignore_index):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    keep = labels != ignore_index
    # One read of the device for both facts: whether any cell counts, and whether a counted
    # one is no target (2 gave a negative loss; -1 labels with ignore_index left at -100
    # were trained as targets).
    off_target = keep & (labels != 0) & (labels != 1)
    any_kept, any_off_target = torch.stack([keep.any(), off_target.any()]).tolist()
    if any_off_target:
        found = labels[off_target].unique()[:5].tolist()
        raise ValueError(f"labels must be 0, 1 or ignore_index={ignore_index}, got {found}")
    if not any_kept:
        # Padding cells hold -inf, and -inf * 0 is NaN: zero them first.
        return logits.masked_fill(~torch.isfinite(logits), 0.0).sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[keep].float(), labels[keep].float())


def _recompute_without_cudnn():
    """Checkpointing's (forward, recomputation) contexts: the forward runs inside run_layers'
    own, the recomputation in backward() needs its own."""
    return contextlib.nullcontext(), without_cudnn_attention()


def last_real_token(attention_mask: Tensor) -> Tensor:
    """Index of the last real token per sample (the one just before the answer)."""
    length = attention_mask.shape[1]
    return length - 1 - attention_mask.flip(1).long().argmax(1)


def gather_visual(states: Tensor, visual_mask: Tensor) -> tuple[Tensor, Tensor]:
    """The visual tokens of each sample in sequence order, padded to the largest count:
    (B, Nmax, D) states and (B, Nmax) bool real-cell mask."""
    counts = visual_mask.sum(1)
    width = int(counts.max()) if counts.numel() else 0
    order = torch.argsort((~visual_mask).to(torch.int8), dim=1, stable=True)[:, :width]
    cells = torch.arange(width, device=states.device)[None, :] < counts[:, None]
    gathered = states.gather(1, order[..., None].expand(-1, -1, states.shape[-1]))
    return gathered, cells


def _slice_ends(positions: slice, length: int) -> tuple[int, int]:
    """A slice's start and stop over ``length`` positions as Python reads them (None, or what
    operator.index takes: numpy's ints, 0-d integer tensors; negatives from the end), not
    clipped: an end past the sequence stays past it. (-1, -1) for ends of another type."""
    ends = []
    for end, default in ((positions.start, 0), (positions.stop, length)):
        if end is None:
            ends.append(default)
            continue
        try:
            index = operator.index(end) if not isinstance(end, bool) else None
        except TypeError:
            index = None
        if index is None:
            return -1, -1
        ends.append(index + length if index < 0 else index)
    return ends[0], ends[1]


class RegionProposalNetwork(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="sdrpn",
    tags=["sdrpn", "sd-rpn", "llava", "region-proposal-network"],
):
    """The RPN (see the module docstring). Built with ``from_llava``; saved with ``save`` or
    ``save_pretrained`` (which adds the model card) and ``push_to_hub``; loaded onto its
    base model with ``load`` (local folder) or ``from_pretrained`` (local folder or Hub id)."""

    def __init__(
        self,
        layers: nn.ModuleList,
        norm: nn.Module,
        head_norm: nn.Module,
        q_proj: nn.Linear,
        k_proj: nn.Linear,
        rotary_emb: nn.Module,
        text_config,
        config: RPNConfig,
    ):
        super().__init__()
        self.layers = layers
        self.norm = norm
        self.head_norm = head_norm
        self.q_proj = q_proj
        self.k_proj = k_proj
        self.rotary_emb = rotary_emb
        self.text_config = text_config
        self.config = config
        self.gradient_checkpointing = False

    @classmethod
    def from_llava(
        cls,
        model: nn.Module,
        branch_layer: int = 15,
        depth: int = 3,
        *,
        preset: str | None = None,
        prompt_template: str = PROMPT_TEMPLATE,
        preprocessing: str = "pad",
        roi: RoiOptions | dict | None = None,
    ) -> RegionProposalNetwork:
        """Copies of the backbone's layers K .. K+depth-1 (see the module docstring). The
        template, preprocessing and RoI options (a ``RoiOptions`` or a dict of its fields)
        are recorded for inference."""
        if not isinstance(model, nn.Module) or not hasattr(model, "get_decoder"):
            raise TypeError(f"model must be a LLaVA model (load_llava's), got {type(model).__name__}")
        decoder = model.get_decoder()
        n = len(decoder.layers)
        for name, value in (("branch_layer", branch_layer), ("depth", depth)):
            if not is_int(value):
                raise TypeError(f"{name} must be an int, got {value!r}")
        branch_layer, depth = int(branch_layer), int(depth)
        if not isinstance(roi, (RoiOptions, type(None))):
            roi = RoiOptions.from_dict(roi)
        roi = (roi or RoiOptions()).check_crop_mode()  # what an RPN records is put to use
        check_rpn_template(prompt_template)
        if depth < 1 or branch_layer < 1 or branch_layer + depth > n:
            raise ValueError(
                f"branch_layer and depth must satisfy 1 <= K and K + depth <= {n} "
                f"(decoder layers), got K={branch_layer}, depth={depth}"
            )
        text_config = copy.deepcopy(decoder.config)
        text_config._attn_implementation = "sdpa"
        layers = nn.ModuleList(copy.deepcopy(decoder.layers[branch_layer + i]) for i in range(depth - 1))
        for layer in layers:
            layer.self_attn.config = text_config
        head = decoder.layers[branch_layer + depth - 1]
        config = RPNConfig(
            branch_layer=branch_layer,
            depth=depth,
            preset=preset,
            base_model=getattr(model.config, "_name_or_path", None) or None,
            base_config_fingerprint=config_fingerprint(model.config),
            grid=list(model_grid(model.config)),
            image_size=model.config.vision_config.image_size,
            num_heads=text_config.num_attention_heads,
            hidden_size=text_config.hidden_size,
            base_fingerprint=weights_fingerprint(model, branch_layer - 1),  # the branch layer's input
            prompt_template=prompt_template,
            preprocessing=preprocessing,
            roi=roi.to_dict(),
        )
        rpn = cls(
            layers,
            copy.deepcopy(decoder.norm),
            copy.deepcopy(head.input_layernorm),
            copy.deepcopy(head.self_attn.q_proj),
            copy.deepcopy(head.self_attn.k_proj),
            copy.deepcopy(decoder.rotary_emb),
            text_config,
            config,
        )
        return rpn.requires_grad_(True)

    def _apply(self, fn, recurse=True):
        """As nn.Module's (under .to(), .half(), .cuda()...), except that the rotary
        frequencies keep their dtype, float32 as the backbone's keep theirs when it loads in
        half precision: rounded to bf16, RoPE at LLaVA's positions turns the copied layers'
        queries and keys up to 0.8 rad away from what they were trained with."""
        kept = dict(self.rotary_emb.named_buffers())
        super()._apply(fn, recurse)
        for name, exact in kept.items():
            moved = getattr(self.rotary_emb, name)
            if moved.dtype != exact.dtype:
                setattr(self.rotary_emb, name, exact.to(moved.device))
        return self

    def gradient_checkpointing_enable(self) -> None:
        self.gradient_checkpointing = True

    @without_cudnn_attention()
    def run_layers(self, hidden_states: Tensor, attention_mask: Tensor | None, position_ids: Tensor) -> Tensor:
        """The copied decoder layers on the branch-point hidden states (B, L, D)."""
        # No positions for the mask: from them it would look for packed sequences, which an
        # RPN input never holds, with a device read.
        # The cache (none) by position: transformers 5.25 renamed its argument (llava.hf_version).
        mask = create_causal_mask(self.text_config, hidden_states, attention_mask, None)
        rope = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                # The backward recomputes the layer after this call has returned: under the
                # same attention kernels, or the recomputation would not match the forward.
                hidden_states = checkpoint(
                    layer, hidden_states, mask, position_ids, None, False, rope,
                    use_reentrant=False, context_fn=_recompute_without_cudnn,
                )  # fmt: skip
            else:
                hidden_states = layer(
                    hidden_states, attention_mask=mask, position_ids=position_ids, position_embeddings=rope
                )
        return hidden_states

    def _check_inputs(self, hidden_states, attention_mask, position_ids, visual_mask) -> None:
        """Shapes and dtypes against each other and the RPN, read on the host only (no device
        wait): a mask of another length or a slice past the end would score other tokens."""
        width = self.config.hidden_size
        if not isinstance(hidden_states, Tensor) or hidden_states.dim() != 3 or hidden_states.shape[-1] != width:
            got = list(hidden_states.shape) if isinstance(hidden_states, Tensor) else type(hidden_states).__name__
            raise ValueError(f"hidden_states must be (B, L, {width}), got {got}")
        batch, length = hidden_states.shape[:2]
        dtype = self.q_proj.weight.dtype
        if hidden_states.dtype != dtype and not torch.is_autocast_enabled(hidden_states.device.type):
            raise ValueError(f"hidden_states must be {dtype} (the RPN's weights'), got {hidden_states.dtype}")

        def check_rows(name, value, shape_ok, what):
            if not isinstance(value, Tensor) or value.dim() != 2 or not shape_ok(value.shape):
                got = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{name} must be {what} (hidden_states is {batch} x {length}), got {got}")
            if value.is_floating_point() or value.is_complex():
                raise ValueError(f"{name} must hold integers or bools, got {value.dtype}")

        if attention_mask is not None:
            check_rows("attention_mask", attention_mask, lambda s: tuple(s) == (batch, length), "(B, L)")
        check_rows("position_ids", position_ids, lambda s: s[1] == length and s[0] in (1, batch), "(B, L) or (1, L)")
        if isinstance(visual_mask, slice):
            start, stop = _slice_ends(visual_mask, length)
            if visual_mask.step not in (None, 1) or not 0 <= start < stop <= length:
                raise ValueError(
                    f"visual_mask as a slice must select consecutive positions of the {length}, got {visual_mask}"
                )
        else:
            check_rows("visual_mask", visual_mask, lambda s: tuple(s) == (batch, length), "(B, L) bool or a slice")
            if visual_mask.dtype != torch.bool:
                raise ValueError(f"visual_mask must be bool, got {visual_mask.dtype}")

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None,
        position_ids: Tensor,
        visual_mask: Tensor | slice,
    ) -> Tensor:
        """Logits (B, Nmax) over each sample's visual tokens in sequence order (row-major on
        its grid); -inf past a sample's own count when grids differ.

        Args:
            hidden_states: (B, L, D) hidden states entering layer K (``hidden_states[K]``).
            attention_mask: (B, L) 1 for real tokens, or None where no sample is padded.
            position_ids: (B, L) positions as the backbone numbered them.
            visual_mask: (B, L) bool, True on visual tokens; or a slice of positions that
                holds the visual tokens of every sample.

        What the caller knows on the host spares device reads, each of which makes the host
        wait for the GPU: a mask is read for whether it pads anything, and a visual mask
        for the largest count and whether every sample reaches it.
        """
        self._check_inputs(hidden_states, attention_mask, position_ids, visual_mask)
        h = self.run_layers(hidden_states, attention_mask, position_ids)
        h = self.head_norm(self.norm(h))
        if attention_mask is None:
            query = h[:, -1]
        else:
            batch = torch.arange(h.shape[0], device=h.device)
            query = h[batch, last_real_token(attention_mask)]
        if isinstance(visual_mask, slice):
            visual, cells = h[:, visual_mask], None
        else:
            visual, cells = gather_visual(h, visual_mask)
            cells = None if bool(cells.all()) else cells
        # The op takes one dtype: under autocast, the autocast dtype (the parameters stay
        # float32 masters and receive float32 gradients through the casts).
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        like = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return ops.rpn_scores(
            like(query),
            like(visual),
            like(self.q_proj.weight),
            like(self.k_proj.weight),
            self.config.num_heads,
            q_bias=like(self.q_proj.bias),
            k_bias=like(self.k_proj.bias),
            visual_mask=cells,
        )

    # ---- persistence ----------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith("rotary_emb.")}

    def weights_digest(self) -> str:
        """A short hash of the first and last eight values of every trained tensor, exact:
        two RPNs of one configuration trained apart differ in it (a whole-weights hash would
        read a 7B RPN's gigabyte)."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.trainable_state_dict().items()):
            flat = tensor.flatten()
            ends = torch.cat([flat[:8], flat[-8:]]).float().cpu()
            digest.update(name.encode() + ends.numpy().tobytes())
        return digest.hexdigest()[:16]

    def save(self, folder: str) -> None:
        """Only the RPN's weights (safetensors) and its config (rpn_config.json); each file
        atomic. A config.json that save_pretrained left there is kept equal to it. Weights
        holding NaN or Inf are refused, as ``load`` would refuse them."""
        tensors = {k: v.cpu() for k, v in self.trainable_state_dict().items()}
        bad = non_finite_tensors(tensors)
        if bad:
            raise ValueError(f"the RPN's weights hold NaN or Inf values: {bad}; not saved to {folder}")
        write_atomic(os.path.join(folder, WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp))
        if os.path.isfile(os.path.join(folder, HUB_CONFIG_NAME)):
            write_json(os.path.join(folder, HUB_CONFIG_NAME), self.config.to_dict())
        write_json(os.path.join(folder, CONFIG_NAME), self.config.to_dict())

    # huggingface_hub's mixin: save_pretrained and push_to_hub call these two.
    def _save_pretrained(self, save_directory: Path) -> None:
        self.save(str(save_directory))
        write_json(os.path.join(save_directory, HUB_CONFIG_NAME), self.config.to_dict())
        # The mixin writes a card only where there is none; a card sdrpn wrote describes
        # older weights, so it goes and the mixin writes this one's.
        card = Path(save_directory) / CARD_NAME
        if card.is_file() and GENERATED_MARK in card.read_text(errors="replace"):
            card.unlink()

    def generate_model_card(self, *, metrics: dict | None = None, training: dict | None = None) -> ModelCard:
        """The card save_pretrained writes; pass metrics and training settings through its
        ``model_card_kwargs``."""
        return rpn_card(self.config, metrics=metrics, training=training, tags=self._hub_mixin_info.model_card_data.tags)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        model: nn.Module,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
    ) -> RegionProposalNetwork:
        """The RPN of a local folder or a Hub id, rebuilt on its base model `model` with the
        checks of ``load``. A Hub id is read from the local Hub cache and fetched where it is
        missing there, unless offline (HF_HUB_OFFLINE=1 or local_files_only); the other
        arguments are huggingface_hub's. Raises ModelNotFoundError saying what it tried."""
        return cls._from_pretrained(
            model_id=str(pretrained_model_name_or_path),
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            model=model,
        )

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        model: nn.Module,
    ) -> RegionProposalNetwork:
        folder = hub_folder(
            model_id,
            (CONFIG_NAME, WEIGHTS_NAME),
            "RPN",
            optional=(HUB_CONFIG_NAME,),
            revision=revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
        )
        return cls.load(folder, model)

    @classmethod
    def load(cls, folder: str, model: nn.Module) -> RegionProposalNetwork:
        """Rebuild on `model` and load saved weights. Refuses a different base model, a
        config that contradicts the model, the weights or the folder's config.json, and
        non-finite weights."""
        config = read_rpn_config(folder)
        try:
            rpn = cls.from_llava(model, config.branch_layer, config.depth)
        except ValueError as err:  # a branch the model does not have: the folder's, not the caller's
            raise ValueError(f"the RPN in {folder} ({CONFIG_NAME}): {err}") from None
        derived = rpn.config
        what = config.base_model_problem(model)
        if what:
            raise ValueError(
                f"the RPN in {folder} was trained on another base model ({what}): "
                f"{config.base_model!r}, hidden size {config.hidden_size}; this model "
                f"is {derived.base_model!r}, hidden size {derived.hidden_size}"
            )
        # What the model determines comes from the model; a config that says otherwise is refused.
        for name in ("num_heads", "grid", "image_size"):
            recorded = getattr(config, name)
            if recorded not in (None, getattr(derived, name)):
                raise ValueError(
                    f"{CONFIG_NAME} in {folder} says {name}={recorded!r}, but the base model "
                    f"has {getattr(derived, name)!r}"
                )
        weights = read_safetensors(os.path.join(folder, WEIGHTS_NAME))
        bad = non_finite_tensors(weights)
        if bad:
            raise ValueError(f"RPN weights in {folder} hold NaN or Inf values: {bad}")
        own = rpn.state_dict()
        misfit = [f"{k} {tuple(v.shape)} (the model's {tuple(own[k].shape)})" for k, v in weights.items()
                  if k in own and v.shape != own[k].shape]  # fmt: skip
        # Float weights of another precision are cast, as a checkpoint's are; integers are not weights.
        misfit += [f"{k} of {v.dtype} (the model's {own[k].dtype})" for k, v in weights.items()
                   if k in own and own[k].is_floating_point() and not v.is_floating_point()]  # fmt: skip
        if misfit:
            raise ValueError(f"RPN weights in {folder} do not fit this model: {', '.join(misfit)}")
        missing, unexpected = rpn.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.startswith("rotary_emb.")]
        if missing or unexpected:
            raise ValueError(f"RPN weights in {folder} do not fit: missing {missing}, unexpected {unexpected}")
        rpn.config = dataclasses.replace(
            config, num_heads=derived.num_heads, grid=derived.grid, image_size=derived.image_size
        )
        # In eval mode throughout, as Hugging Face's from_pretrained returns a model (the copied
        # layers were, the new module around them was not).
        return rpn.to(device=model_device(model), dtype=model_dtype(model)).eval()
