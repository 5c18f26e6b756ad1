"""Run the `radgraph` package (0.1.18, the latest) under transformers 5.

radgraph vendors allennlp and DyGIE++, written against transformers 4. On its inference path
(building `RadGraph`, then tokenising, indexing and embedding reports) transformers 5 breaks it
in these places, each found by running it, each shimmed here and nowhere else:

1. `PreTrainedTokenizerBase.encode_plus` is gone (transformers 5 kept only `__call__`).
   `PretrainedTransformerTokenizer` calls it to reverse-engineer the special tokens, to tokenise
   and to split words into wordpieces. Shim: `encode_plus(text, text_pair=None, **kw)` ->
   `tokenizer(text, text_pair, **kw)`; for one (pair of) string(s) both return the same
   un-batched `BatchEncoding` for the keyword arguments radgraph passes.
2. `build_inputs_with_special_tokens` is gone from the tokenizers-backed tokenizers.
   `PretrainedTransformerIndexer` calls it on every report when `max_length` is set (the
   released configs set it), to wrap each `max_length` segment of wordpieces in special
   tokens. Shim, with transformers 4's BERT semantics: `[CLS] a [SEP]` for one sequence and
   `[CLS] a [SEP] b [SEP]` for a pair, with the tokenizer's own cls/sep ids.

Nothing else on that path broke (model construction, strict loading of weights.th, the
mismatched embedder, span extraction, NER and relation decoding, F1RadGraph): checked end to
end on a tiny archive in tests/test_radgraph_plugin.py.

The shims go on the tokenizer objects radgraph itself creates (through
`radgraph.allennlp.common.cached_transformers.get_tokenizer`, the one place it makes them), and
only where the attribute is missing, so a transformers 4 tokenizer is left as it is and no
transformers class is changed. We never copy radgraph's code.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

_MARK = "_medrega_transformers5_compat"


def _encode_plus(tokenizer, text, text_pair=None, **kwargs: Any):
    return tokenizer(text, text_pair, **kwargs)


def _build_inputs_with_special_tokens(tokenizer, token_ids_0: list[int],
                                      token_ids_1: list[int] | None = None) -> list[int]:
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls is None or sep is None:
        raise ValueError(f"radgraph: tokenizer {type(tokenizer).__name__} has no [CLS]/[SEP] token; "
                         "RadGraph's models are BERT models")
    if token_ids_1 is None:
        return [cls, *token_ids_0, sep]
    return [cls, *token_ids_0, sep, *token_ids_1, sep]


def patch_tokenizer(tokenizer):
    """Give `tokenizer` (an instance) the transformers-4 methods radgraph calls, where missing."""
    if not hasattr(tokenizer, "encode_plus"):
        tokenizer.encode_plus = functools.partial(_encode_plus, tokenizer)
    if not hasattr(tokenizer, "build_inputs_with_special_tokens"):
        tokenizer.build_inputs_with_special_tokens = functools.partial(_build_inputs_with_special_tokens, tokenizer)
    return tokenizer


def install() -> None:
    """Wrap radgraph's tokenizer factory so every tokenizer it makes is patched (idempotent)."""
    from radgraph.allennlp.common import cached_transformers

    original = cached_transformers.get_tokenizer
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def get_tokenizer(model_name: str, **kwargs: Any):
        return patch_tokenizer(original(model_name, **kwargs))

    setattr(get_tokenizer, _MARK, True)
    cached_transformers.get_tokenizer = get_tokenizer


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face hub offline mode while radgraph loads its BERT config and tokenizer: it calls
    `from_pretrained(name)` without `local_files_only`, and `is_offline_mode()` reads this flag
    at call time, so nothing can be fetched and a name that is not local fails instead."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
