"""sdrpn passes a KV cache by one name to every forward it calls (sdrpn.llava.hf_version):
the installed transformers must take it under that name in each of them."""

import inspect

import pytest
from transformers import LlavaForConditionalGeneration
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel
from transformers.models.llava.modeling_llava import LlavaModel

from sdrpn.llava.hf_version import CACHE_NAME, cache_kwarg


@pytest.mark.parametrize("cls", [LlavaForConditionalGeneration, LlavaModel, LlamaModel, LlamaDecoderLayer])
def test_every_forward_takes_the_cache_by_that_name(cls):
    assert CACHE_NAME in inspect.signature(cls.forward).parameters
    assert cache_kwarg(None) == {CACHE_NAME: None}
