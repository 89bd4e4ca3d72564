"""`sdrpn_llava`, an lmms-eval model: LLaVA-1.5 answering with SD-RPN's RoI crops, or with
roi=false from the thumbnail alone (the baseline rows).

lmms-eval 0.7 finds it through the entry-point group "lmms_eval.models" that pyproject.toml
declares (``sdrpn.integrations:lmms_eval_manifest``), so once sdrpn is installed

    python -m lmms_eval --model sdrpn_llava \
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,rpn=RPN,task_preset=textvqa \
        --tasks textvqa_val --batch_size 8

evaluates SD-RPN on any lmms-eval task that answers one image by generation. The model
args are EvalModelOptions'. Requests are answered in batches of batch_size, grouped by
task and generation kwargs (each group its own threshold and decoding), through
``SDRPNLlava.generate`` (or ``BaseLlava.generate`` for roi=false).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image

from ..infer.baseline import BaseLlava
from ..infer.pipeline import SDRPNLlava
from ..llava.inputs import question_text
from ..llava.loading import load_llava
from ..llava.presets import resolve_preset
from ..progress import show_progress
from ..rpn.model import RegionProposalNetwork
from .eval_options import Decoding, EvalModelOptions, decoding_of

log = logging.getLogger(__name__)


class SDRPNLlavaEval(lmms):
    """lmms-eval's simple-model interface over sdrpn's inference: contexts are questions
    (the prompt template is the RPN folder's), each document gives one image."""

    is_simple = True

    def __init__(self, **model_args) -> None:
        super().__init__()
        self.options = EvalModelOptions.from_model_args(model_args)
        opts = self.options
        device = opts.resolved_device(torch.cuda.is_available())
        self.model, self.tokenizer = load_llava(opts.pretrained, opts.dtype, device)
        self.rpn = RegionProposalNetwork.from_pretrained(opts.rpn, model=self.model) if opts.rpn else None
        if opts.roi:
            self.baseline = None
        elif self.rpn is not None:  # the prompt and images exactly as the RoI row has them
            config = self.rpn.config
            self.baseline = BaseLlava(
                self.model, self.tokenizer, prompt_template=config.prompt_template, preprocessing=config.preprocessing
            )
        else:
            template = resolve_preset(None, self.model).prompt_template
            self.baseline = BaseLlava(self.model, self.tokenizer, prompt_template=template)
        self._pipes: dict[str | None, SDRPNLlava] = {}

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> SDRPNLlavaEval:
        """As lmms-eval's, except that a setting given in both --model_args and lmms-eval's
        own flags (batch_size, device) takes the model_args value instead of failing:
        --batch_size always arrives (default 1), so batch_size=N in model_args could not
        be given otherwise."""
        from lmms_eval.utils import simple_parse_args_string

        args = {k: v for k, v in (additional_config or {}).items() if v is not None}
        args.update(simple_parse_args_string(arg_string))
        if "max_batch_size" in args:
            raise ValueError(
                f"max_batch_size applies to batch_size=auto, which sdrpn_llava does not take; got "
                f"max_batch_size={args['max_batch_size']!r}: pass batch_size=N"
            )
        return cls(**args)

    @property
    def batch_size(self) -> int:
        return self.options.batch_size

    # ---- answering -----------------------------------------------------------------------
    def _pipe(self, task: str) -> SDRPNLlava:
        """The RoI pipeline with the threshold that answers `task` (one per benchmark)."""
        preset = self.options.preset_for(task)
        if preset not in self._pipes:
            config = self.rpn.config
            roi = config.task_roi_options(preset) if preset else config.roi_options
            roi = roi.updated(threshold=self.options.threshold, crop_mode=self.options.crop_mode)
            self._pipes[preset] = SDRPNLlava(self.model, self.tokenizer, self.rpn, roi=roi)
            log.info("sdrpn_llava: task %s answered with %s", task, roi)
        return self._pipes[preset]

    def _answerer(self, task: str) -> BaseLlava | SDRPNLlava:
        return self.baseline if self.baseline is not None else self._pipe(task)

    @staticmethod
    def _answer(
        answerer: BaseLlava | SDRPNLlava, images: list[Image.Image], questions: list[str], decoding: Decoding
    ) -> list[str]:
        answers = answerer.generate(images, questions, decoding.max_new_tokens)
        return [decoding.cut(a if isinstance(a, str) else a.text) for a in answers]

    def _sample(self, request: Instance) -> tuple[Image.Image, str]:
        """The image and question of one request: its document's single image, and its
        context without the image placeholder (the template places the image)."""
        context, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = visuals if isinstance(visuals, (list, tuple)) else [visuals]
        if len(visuals) != 1 or not isinstance(visuals[0], Image.Image):
            kinds = [type(v).__name__ for v in visuals]
            raise ValueError(
                f"sdrpn_llava answers about one image per question; task {task!r} document {doc_id} gives {kinds}"
            )
        question = question_text(context)
        if not question:
            raise ValueError(f"task {task!r} document {doc_id} has an empty question: context={context!r}")
        return visuals[0], question

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, each cut at its task's stop strings, in the order of `requests`.
        Requests are batched within groups of one task and one set of generation kwargs. A
        question whose prompt does not fit the model's context (with the most crop tokens
        it could get) is answered with an empty string and named in a warning, as `sdrpn
        infer --data` skips and counts it: one such document does not end the evaluation."""
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            _, gen_kwargs, _, _, task, _ = request.args
            groups[(task, json.dumps(gen_kwargs, sort_keys=True, default=str))].append(index)
        batches = []
        for (task, _), indices in groups.items():
            decoding = decoding_of(requests[indices[0]].args[1], self.options.max_new_tokens)
            batches += [
                (task, decoding, indices[i : i + self.batch_size]) for i in range(0, len(indices), self.batch_size)
            ]
        out: list[str | None] = [None] * len(requests)
        unanswered = 0
        bar = show_progress(total=len(requests), desc="sdrpn_llava", unit="sample", disable=self.rank != 0)
        for task, decoding, indices in batches:
            samples = {i: self._sample(requests[i]) for i in indices}
            answerer = self._answerer(task)
            for i, (_, question) in list(samples.items()):
                problem = answerer.prompt_too_long(question)
                if problem:
                    log.warning(
                        "sdrpn_llava: task %r document %s answered empty: its question %s",
                        task,
                        requests[i].args[3],
                        problem,
                    )
                    out[i] = ""
                    unanswered += 1
                    del samples[i]
            if samples:
                images, questions = zip(*samples.values())
                for i, text in zip(samples, self._answer(answerer, list(images), list(questions), decoding)):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], text)
            bar.update(len(indices))
        bar.close()
        if unanswered:
            log.warning(
                "sdrpn_llava: %d of %d questions answered empty, their prompts past the model's context",
                unanswered,
                len(requests),
            )
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "sdrpn_llava answers by greedy generation only: loglikelihood tasks (multiple choice scored by "
            "likelihood) are not supported; use the task's generate_until variant"
        )

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "sdrpn_llava answers one question about one image per request: multi-round generation is not supported"
        )
