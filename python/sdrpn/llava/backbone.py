"""The frozen backbone's part of RPN training and inference: hidden states entering the
branch layer K, computed through layers 0 .. K-1 only."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention_kernels import without_cudnn_attention
from .inputs import position_ids_from_mask
from .model_facts import model_dtype
from .probe import ProbeDone, capture_outputs, decoder_layers
from .turns import model_turn


@torch.no_grad()
@without_cudnn_attention()
def branch_hidden_states(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, branch_layer: int
) -> tuple[Tensor, Tensor]:
    """(hidden states entering layer K (B, L, D), position ids (B, L)).

    Equal to ``hidden_states[K]`` of a full forward for K below the decoder's depth (the
    last of Hugging Face's hidden states is normed; this is layer K-1's output), but layers
    >= K never run: that output is taken by a forward hook of this thread, which ends the
    forward there. The model is not changed, so a forward of another thread meanwhile runs
    whole; the call takes the model's turn (``turns``) among sdrpn's calls.
    """
    layers = len(decoder_layers(model))
    if isinstance(branch_layer, bool) or not isinstance(branch_layer, int) or not 1 <= branch_layer <= layers:
        raise ValueError(f"branch_layer must be an int in [1, {layers}] (the decoder's layers), got {branch_layer!r}")
    position_ids = position_ids_from_mask(attention_mask)
    with model_turn(model), capture_outputs(decoder_layers(model)[branch_layer - 1], stop=True) as captured:
        try:
            model.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values.to(model_dtype(model)),
                position_ids=position_ids,
                use_cache=False,
            )
        except ProbeDone:
            pass
    return captured[-1], position_ids
