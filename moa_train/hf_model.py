"""The transformers classes of an exported model that is not plain Llama: `MoaConfig` and `MoaForCausalLM`.

`MoaForCausalLM` wraps moa_train's own `Transformer` (model.py): the forward pass is written once, in
this package. An export directory (export.py) carries two one-line files, configuration_moa.py and
modeling_moa.py, that import these classes from the installed moa_train, so that
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` finds them through `auto_map`.
Importing this module imports transformers (the `eval` extra); training never does.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .model import Transformer

# transformers 5 renamed the cache argument and output field `past_key_values` to `cache`
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class MoaConfig(PretrainedConfig):
    model_type = "moa"

    def __init__(self, moa_model: dict | None = None, moa_ffn: dict | None = None, vocab_size: int = 0,
                 hidden_size: int = 0, num_hidden_layers: int = 0, num_attention_heads: int = 0,
                 max_position_embeddings: int = 0, tie_word_embeddings: bool = False, **kwargs):
        self.moa_model, self.moa_ffn = moa_model or {}, moa_ffn or {}
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_attention_heads, self.max_position_embeddings = num_attention_heads, max_position_embeddings
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class MoaForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MoaConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_cache_class = True

    def __init__(self, config: MoaConfig):
        super().__init__(config)
        self.model = Transformer(OmegaConf.create(config.moa_model), OmegaConf.create(config.moa_ffn))
        self.post_init()

    def _init_weights(self, module) -> None:
        pass  # the weights come from the export; a fresh model is initialised by Transformer.init_weights

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        model.model.reset_buffers()  # transformers loads into uninitialised memory: unsaved buffers are garbage
        return model

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def get_output_embeddings(self):
        return self.model.output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels=None,
                use_cache: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("MoaForCausalLM does not support padding (an attention_mask with zeros): "
                             "run sequences of one length, or one at a time.")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if use_cache and cache is None:
            from transformers import DynamicCache

            cache = DynamicCache()
        logits = self.model(input_ids, cache=cache if use_cache is not False else None)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})
