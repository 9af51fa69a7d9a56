"""Run ImageReward 1.5's scoring code (BLIP ViT + BERT "med" encoder) under transformers 5.

Why this exists: ``image-reward`` 1.5 is its last release and cannot be imported as is here.

1. ``import ImageReward`` runs the package ``__init__``, which imports its training script
   (``ReFL.py``: accelerate, datasets, diffusers training utils) and the CLIP/BLIP/aesthetic
   baselines (OpenAI ``clip``). None of that is needed to score, and accelerate/datasets are not
   installed. So the four modules that scoring needs (``models/BLIP/{vit,med,blip,blip_pretrain}.py``
   and ``ImageReward.py``) are loaded from the installed package's folder under a private package
   name (:data:`ALIAS`), without running its ``__init__`` files. ``import ImageReward`` elsewhere
   in the process is not affected.
2. ``med.py`` imports helpers that transformers 5 removed from ``transformers.modeling_utils``
   (``apply_chunking_to_forward``, ``prune_linear_layer`` now in ``transformers.pytorch_utils``;
   ``find_pruneable_heads_and_indices`` gone). The first two are re-exported; the third is
   provided here. Only missing names are added, nothing existing is replaced.
3. BLIP's ``BertModel`` calls ``get_head_mask``/``invert_attention_mask`` (removed from
   ``PreTrainedModel``) and ``init_weights()`` without the ``post_init()`` transformers 5 requires.
   These are added to BLIP's own ``BertPreTrainedModel`` subclass only, not to transformers.
4. BLIP loads ``BertTokenizer.from_pretrained("bert-base-uncased")`` by name, and reads
   ``additional_special_tokens_ids`` (renamed in transformers 5). Worse, with the files absent
   and ``local_files_only=True`` transformers 5 returns a 5-token tokenizer *without error*.
   :func:`load_tokenizer` resolves ``vocab.txt`` explicitly and checks the vocabulary size.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
import warnings
from pathlib import Path
from typing import Iterator

ALIAS = "_sinkscope_imagereward"
BERT_VOCAB_SIZE = 30522  # bert-base-uncased; ImageReward's med_config adds [DEC] and [ENC] → 30524
_MODULES: types.SimpleNamespace | None = None


def find_pruneable_heads_and_indices(heads, n_heads, head_size, already_pruned_heads):
    """Heads left to prune (shifted for those already pruned) and the flat indices to keep."""
    import torch

    heads = set(heads) - set(already_pruned_heads)
    keep = torch.ones(n_heads, head_size, dtype=torch.bool)
    for head in heads:
        shift = sum(1 for h in already_pruned_heads if h < head)
        keep[head - shift] = False
    index = torch.arange(n_heads * head_size)[keep.reshape(-1)].long()
    return heads, index


def patch_transformers() -> None:
    """Add the helpers med.py imports from ``transformers.modeling_utils`` if they are missing."""
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(mu, name):
            setattr(mu, name, getattr(pu, name))
    if not hasattr(mu, "find_pruneable_heads_and_indices"):
        mu.find_pruneable_heads_and_indices = find_pruneable_heads_and_indices


def _invert_attention_mask(self, encoder_attention_mask):
    """1 = attend / 0 = masked → additive mask (0 / dtype minimum), broadcastable over heads."""
    import torch

    mask = encoder_attention_mask
    mask = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
    mask = mask.to(dtype=self.dtype)
    return (1.0 - mask) * torch.finfo(self.dtype).min


def _get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
    if head_mask is not None:
        raise NotImplementedError("head masks are not used by ImageReward scoring")
    return [None] * num_hidden_layers


def _init_weights(self):
    # transformers 5 needs post_init() (which sets all_tied_weights_keys and then initialises);
    # BLIP calls init_weights() directly. Route the first call through post_init().
    from transformers import PreTrainedModel

    if "all_tied_weights_keys" not in self.__dict__:
        return self.post_init()
    return PreTrainedModel.init_weights(self)


def _patch_blip_classes(med: types.ModuleType) -> None:
    base = med.BertPreTrainedModel
    for name, fn in (("invert_attention_mask", _invert_attention_mask), ("get_head_mask", _get_head_mask)):
        if not hasattr(base, name):
            setattr(base, name, fn)
    from transformers import PreTrainedModel

    if "all_tied_weights_keys" in PreTrainedModel.post_init.__code__.co_names:
        base.init_weights = _init_weights


def _package_dir() -> Path:
    spec = importlib.util.find_spec("ImageReward")  # finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the 'image-reward' package is not installed (pip install --no-deps image-reward==1.5; "
            "see docs/analysis.md)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _stub_package(name: str, path: Path) -> None:
    if name not in sys.modules:
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]
        mod.__package__ = name
        sys.modules[name] = mod


def load_modules() -> types.SimpleNamespace:
    """Import ImageReward's scoring modules (once) under :data:`ALIAS`, patched for transformers 5.

    Returns a namespace with ``vit``, ``med``, ``blip``, ``blip_pretrain`` and ``reward``
    (the package's ``ImageReward.py``: ``ImageReward``, ``MLP``, ``_transform``).
    """
    global _MODULES
    if _MODULES is not None:
        return _MODULES
    root = _package_dir()
    patch_transformers()
    _stub_package(ALIAS, root)
    _stub_package(f"{ALIAS}.models", root / "models")
    _stub_package(f"{ALIAS}.models.BLIP", root / "models" / "BLIP")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # timm's deprecated module paths used by vit.py
        warnings.simplefilter("ignore", DeprecationWarning)
        vit = importlib.import_module(f"{ALIAS}.models.BLIP.vit")
        med = importlib.import_module(f"{ALIAS}.models.BLIP.med")
        blip = importlib.import_module(f"{ALIAS}.models.BLIP.blip")
        blip_pretrain = importlib.import_module(f"{ALIAS}.models.BLIP.blip_pretrain")
        reward = importlib.import_module(f"{ALIAS}.ImageReward")
    _patch_blip_classes(med)
    _MODULES = types.SimpleNamespace(vit=vit, med=med, blip=blip, blip_pretrain=blip_pretrain, reward=reward)
    return _MODULES


def load_tokenizer(folder: str | Path, expected_vocab: int | None = BERT_VOCAB_SIZE):
    """BLIP's tokenizer: BERT uncased from ``folder`` (must hold vocab.txt) plus [DEC] as BOS and
    [ENC] as an extra special token. ``expected_vocab`` guards against a truncated vocabulary."""
    from transformers import BertTokenizer

    folder = Path(folder)
    vocab = folder / "vocab.txt"
    if not vocab.is_file():
        raise FileNotFoundError(f"BERT vocabulary {vocab} not found")
    tok = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    n_lines = sum(1 for _ in open(vocab, encoding="utf-8"))
    if len(tok.vocab) != n_lines or (expected_vocab is not None and n_lines != expected_vocab):
        raise ValueError(
            f"{vocab}: tokenizer has {len(tok.vocab)} tokens, file has {n_lines}, expected {expected_vocab} "
            "(bert-base-uncased)"
        )
    tok.add_special_tokens({"bos_token": "[DEC]"})
    key = "extra_special_tokens" if hasattr(tok, "extra_special_tokens") else "additional_special_tokens"
    tok.add_special_tokens({key: ["[ENC]"]})
    tok.enc_token_id = tok.convert_tokens_to_ids("[ENC]")
    return tok


@contextlib.contextmanager
def tokenizer_from(folder: str | Path, expected_vocab: int | None = BERT_VOCAB_SIZE) -> Iterator[None]:
    """While active, BLIP's own ``init_tokenizer()`` loads from ``folder`` instead of the Hub name
    (so the package's ``ImageReward``/``BLIP_Pretrain`` classes can be built offline)."""
    mods = load_modules()
    saved = (mods.blip.init_tokenizer, mods.blip_pretrain.init_tokenizer)

    def init_tokenizer():
        return load_tokenizer(folder, expected_vocab)

    mods.blip.init_tokenizer = mods.blip_pretrain.init_tokenizer = init_tokenizer
    try:
        yield
    finally:
        mods.blip.init_tokenizer, mods.blip_pretrain.init_tokenizer = saved
