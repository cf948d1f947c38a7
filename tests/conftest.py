"""Shared test fixtures: a tiny random chat LM that needs no download.

Fixtures
--------
``tiny_model_dir`` (session)
    Path of a folder holding a tiny random ``LlamaForCausalLM`` (vocab 97 =
    the tokenizer's size, hidden 32, 2 layers, 2 heads, tied embeddings, seed 0)
    and its tokenizer, saved with ``save_pretrained``. Any model spec that takes
    a folder accepts it (``load_lm(str(tiny_model_dir))``, ``--student DIR``).

``tiny_lm`` (session)
    That model loaded as a ``gadiag_plugins.students.hf.HFCausalLM`` (float32, CPU,
    temperature 1.0, name "tiny"). It is shared by the whole session: do not
    change its weights, temperature or ``requires_grad`` flags, and zero any
    ``.grad`` you create. Build a private one with ``make_tiny_lm`` instead.

The tokenizer
-------------
Character level: every character of ``TINY_CHARS`` (digits, ASCII letters,
space, newline and common punctuation incl. ``+ - * / = . , ? !``) is one
token; anything else becomes ``<unk>``. Special tokens: ``<pad>`` (0, pad),
``<unk>`` (1), ``<|im_start|>`` (2), ``<|im_end|>`` (3, eos). Its chat template
is ChatML without a default system prompt::

    <|im_start|>user\\nWhat is 2+3?<|im_end|>\\n<|im_start|>assistant\\n

so ``tiny_lm.encode_messages(msgs)`` ends with the ids of
``<|im_start|>assistant\\n`` and ``tiny_lm.tokenizer.encode("2+3=5",
add_special_tokens=False)`` gives one id per character.

Helpers (import them with ``from conftest import make_tiny_model_dir``)
----------------------------------------------------------------------
``make_tiny_tokenizer(chars=TINY_CHARS)``
    The tokenizer above (a ``PreTrainedTokenizerFast``), built in memory.
``make_tiny_model_dir(path, vocab=None, tie=True, seed=0, chars=TINY_CHARS,
init_std=0.3, layers=2)``
    Saves a tiny model + tokenizer into ``path`` and returns ``path``.
    ``vocab`` is the model's logits width (default: the tokenizer's size; a
    larger value pads the vocabulary like real models do). ``tie`` ties input
    and output embeddings. ``init_std`` is the weight init std: the default
    0.3 gives peaked, non-uniform next-token distributions (0.02, the usual
    value, gives nearly uniform ones at this size). Same arguments -> same
    weights.
``make_tiny_lm(path, temperature=1.0, name="tiny", **model_kwargs)``
    ``make_tiny_model_dir`` then ``load_lm``: a private HFCausalLM.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest

SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
TINY_CHARS = string.digits + string.ascii_letters + " \n" + "+-*/=().,:;?!'\"%$^_<>|[]{}#&@"
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_tiny_tokenizer(chars: str = TINY_CHARS):
    """A character-level ChatML tokenizer; see the module docstring."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = SPECIAL_TOKENS + [c for c in dict.fromkeys(chars) if c not in SPECIAL_TOKENS]
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=TINY_CHAT_TEMPLATE,
    )


def make_tiny_model_dir(path, vocab=None, tie=True, seed=0, chars: str = TINY_CHARS, init_std: float = 0.3, layers: int = 2):
    """Save a tiny random LlamaForCausalLM and its tokenizer into `path`; return `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer(chars)
    size = len(tokenizer)
    vocab = size if vocab is None else int(vocab)
    if vocab < size:
        raise ValueError(f"vocab {vocab} is smaller than the tokenizer ({size} tokens)")
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=tie,
        initializer_range=init_std,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_lm(path, temperature: float = 1.0, name: str = "tiny", **model_kwargs):
    """A private tiny HFCausalLM saved under `path`."""
    from gadiag_plugins.students.hf import load_lm

    make_tiny_model_dir(path, **model_kwargs)
    return load_lm(str(path), temperature=temperature, name=name)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    from gadiag_plugins.students.hf import load_lm

    return load_lm(str(tiny_model_dir), name="tiny")


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory):
    """The exact environment's toy student (gadiag_tasks.toy_env), saved as a
    folder: with `--task toy --max-new-tokens 4` its success rates are
    intermediate, so runs on it have real ideal vectors to score."""
    from gadiag_tasks.toy_env import save_toy_model

    return save_toy_model(tmp_path_factory.mktemp("toy-model") / "model")


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module on one torch thread, then restore the setting: tiny
    models run fastest on one thread, and on a busy 2-core machine a second
    thread makes small matmuls far slower. Use it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

