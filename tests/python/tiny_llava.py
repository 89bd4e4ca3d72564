"""A tiny random LLaVA (CLIP vision tower + Llama decoder with GQA) built from a config."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from sdrpn.llava import TeacherForcedBatch

PAD, BOS, EOS, IMAGE = 0, 1, 2, 3
VOCAB = 64


@dataclass
class TinyLlava:
    model: LlavaForConditionalGeneration
    grid: int  # image tokens per side
    image_size: int

    @property
    def num_cells(self) -> int:
        return self.grid * self.grid


@contextmanager
def one_thread():
    """Tiny models' ops are too small to gain from a second thread; on a busy machine torch's
    thread pool costs many times what it gives."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_tiny_llava(
    num_layers: int = 4,
    grid: int = 4,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    num_key_value_heads: int = 2,
    num_attention_heads: int = 4,
) -> TinyLlava:
    torch.manual_seed(seed)
    image_size = 14 * grid
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=14,
        ),
        text_config=LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=num_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            max_position_embeddings=512,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=EOS,
        ),
        image_token_index=IMAGE,
        image_seq_length=grid * grid,
    )
    config._attn_implementation = attn_implementation
    model = LlavaForConditionalGeneration(config).eval()
    # Random embeddings give near-uniform attention; sharper weights make maps that differ.
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            p.mul_(3.0)
    return TinyLlava(model, grid, image_size)


def prompt_ids(num_cells: int, question: list[int]) -> list[int]:
    """bos, 'USER:' (5), image tokens, question, 'ASSISTANT:' (6)."""
    return [BOS, 5] + [IMAGE] * num_cells + question + [6]


def teacher_forced_batch(
    tiny: TinyLlava, questions: list[list[int]], answers: list[list[int]], padding: str = "left", seed: int = 0
) -> TeacherForcedBatch:
    """[prompt, answer] per sample, padded to one length on the given side."""
    gen = torch.Generator().manual_seed(seed)
    seqs, starts, lengths = [], [], []
    for q, a in zip(questions, answers):
        p = prompt_ids(tiny.num_cells, q)
        seqs.append(p + a)
        starts.append(len(p))
        lengths.append(len(a))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        off = width - len(s) if padding == "left" else 0
        ids[b, off : off + len(s)] = torch.tensor(s)
        mask[b, off : off + len(s)] = 1
        starts[b] += off
    pixels = torch.randn(len(seqs), 3, tiny.image_size, tiny.image_size, generator=gen)
    return TeacherForcedBatch(ids, mask, pixels, torch.tensor(starts), torch.tensor(lengths))


def random_tokens(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(7, VOCAB, (n,), generator=gen).tolist()


def row_slice(batch: TeacherForcedBatch, b: int) -> TeacherForcedBatch:
    """Sample b alone, its padding removed."""
    keep = batch.attention_mask[b].bool()
    first = int(keep.int().argmax())
    return TeacherForcedBatch(
        batch.input_ids[b : b + 1, keep],
        batch.attention_mask[b : b + 1, keep],
        batch.pixel_values[b : b + 1],
        batch.answer_start[b : b + 1] - first,
        batch.answer_length[b : b + 1],
    )


WORDS = [
    "USER",
    "ASSISTANT",
    ":",
    "what",
    "is",
    "the",
    "colour",
    "of",
    "tag",
    "red",
    "blue",
    "green",
    "written",
    "on",
    "?",
    "a",
    "b",
    "c",
    "1",
    "2",
    "3",
]


def make_tokenizer():
    """A word-level tokenizer whose special ids match the tiny model's (pad 0, bos 1, eos 2,
    image 3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<image>": IMAGE, "<unk>": 4}
    for word in WORDS:
        vocab[word] = len(vocab)
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
    )


def save_tiny_llava(folder: str, **kwargs) -> TinyLlava:
    """Write a tiny model and its tokenizer as a Hugging Face checkpoint folder."""
    tiny = make_tiny_llava(**kwargs)
    tiny.model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return tiny
