"""Image features for the answering pipeline: the model's own ``get_image_features``
(vision tower, feature layer, projector) on a batch of images, on CUDA replayed as one
CUDA graph per batch size of at most GRAPH_MAX_IMAGES images.

Encoding one 336 px image with CLIP-L launches about a thousand kernels that together keep
an H100-class GPU busy for a millisecond or two, so at small batches the host's launching
sets the time; a replay launches once. Above GRAPH_MAX_IMAGES images the GPU's own work
dominates and the tower runs eagerly (and no more graphs are kept). Replays skip hooks
registered on the vision modules, as the graph decoder's do on the decoder's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .attention_kernels import without_cudnn_attention
from .decode import WeightsWatch, warm_up_and_capture

GRAPH_MAX_IMAGES = 4


@without_cudnn_attention()
def image_features(model: nn.Module, pixels: Tensor) -> Tensor:
    """(N, tokens, D) projected features of N images (N, 3, S, S), as the model's forward
    inserts them at its image tokens."""
    feats = model.model.get_image_features(pixel_values=pixels)
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats


class ImageEncoder:
    """``encoder(pixels)`` is ``image_features(model, pixels)``; with ``graph`` (CUDA only)
    batches of up to GRAPH_MAX_IMAGES images replay a graph captured on their first call.
    ``clear()`` frees the graphs, as new weights do (the model moved or cast); after a
    failed capture the encoder stays eager (the same model would fail again)."""

    def __init__(self, model: nn.Module, graph: bool):
        self.model = model
        self.graph = graph  # asked for
        self.use_graph = graph  # still so: False after a failed capture
        # input shape, dtype -> (input buffer, replay)
        self._graphs: dict[tuple, tuple[Tensor, Callable[[], Tensor]]] = {}
        self._pool = None
        self._weights: WeightsWatch | None = None  # on the weights the graphs were captured for

    def clear(self) -> None:
        self._graphs.clear()
        self._pool = None

    def graph_counts(self) -> dict[str, int]:
        """As DecoderPool.graph_counts: the graphs kept, and 1 after a failed capture."""
        return {"graphs": len(self._graphs), "failed_captures": int(self.graph and not self.use_graph)}

    @torch.no_grad()
    def __call__(self, pixels: Tensor) -> Tensor:
        if not self.use_graph or pixels.shape[0] > GRAPH_MAX_IMAGES:
            return image_features(self.model, pixels)
        if self._weights is None or self._weights.changed():
            self.clear()
            self._weights = WeightsWatch(self.model)
        entry = self._graphs.get((pixels.shape, pixels.dtype))
        if entry is None:
            return self._capture(pixels)
        buffer, replay = entry
        buffer.copy_(pixels)
        return replay().clone()  # the graph's output buffer is rewritten by the next replay

    def _capture(self, pixels: Tensor) -> Tensor:
        """``pixels``' features from one eager run, after which the tower is recorded as a
        graph reading a buffer of their shape; a capture that fails leaves this encoder
        eager."""
        buffer = pixels.clone()
        if self._pool is None:  # one memory pool for this encoder's graphs: they never run at once
            self._pool = torch.cuda.graph_pool_handle()
        run = lambda: image_features(self.model, buffer)  # noqa: E731
        out, replay = warm_up_and_capture(run, pixels.device, "encoding images without graphs", self._pool)
        if replay is None:
            self.use_graph = False
        else:
            self._graphs[(pixels.shape, pixels.dtype)] = (buffer, replay)
        return out
