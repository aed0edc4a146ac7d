"""Tokenizers: load a checkpoint's tokenizer from a local directory, or train a tiny byte-level BPE offline.

Loading (``load_tokenizer``)
    ``AutoTokenizer.from_pretrained(path, local_files_only=True)`` and nothing else: no hub, no ``trust_remote_code``.
    LLaMA checkpoints ship ``tokenizer.model`` (sentencepiece) and/or ``tokenizer.json``; whichever AutoTokenizer
    picks is fine, because the conversation template (``g4v_jax.data.template``) encodes every piece with
    ``add_special_tokens=False`` and inserts BOS/EOS itself. That matters: a LlamaTokenizer built from
    ``tokenizer.model`` adds no BOS unless ``add_bos_token=True``, so relying on the tokenizer's own specials would
    silently change the sequences between checkpoints. The path is checked first, so a typo fails here with
    ``FileNotFoundError`` naming the path instead of deep inside transformers (or as a hub lookup).

Tiny tokenizers (``build_bpe_tokenizer``)
    Tests and the synthetic-world demo pre-train tiny LLMs on their own text, so they need a real tokenizer without a
    download. It is a GPT-2-style byte-level BPE trained with the ``tokenizers`` library:

    - Byte-level (all 256 bytes are in the initial alphabet): any text round-trips, ``decode(encode(s)) == s``,
      non-ASCII included, and ``<unk>`` is never produced.
    - No prefix space and no normaliser: a piece encodes exactly as written, which is what the template relies on to
      put separator spaces where it wants them.
    - Specials at fixed ids: ``<unk>`` = 0, ``<s>`` (BOS) = 1, ``</s>`` (EOS) = 2, ``<pad>`` = 3; ``extra_tokens``
      follow at 4, 5, ... as atomic *non-special* tokens (never split, kept by ``skip_special_tokens=True``).
    - No post-processor: ``encode`` adds no BOS/EOS even with ``add_special_tokens=True``, like LLaMA's sentencepiece
      tokenizer; the template adds them.
    - Deterministic: the same texts (in the same order) give a byte-identical ``tokenizer.json``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)

# Any one of these makes a directory loadable by AutoTokenizer (fast json, sentencepiece, GPT-2 BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
# What a tokenizer directory may hold beyond those: copied along with them. transformers writes a chat template to
# its own file (``chat_template.jinja``; ``.json`` before 4.43 in processors): without it an instruct LLM's own chat
# format is lost on the way to a trained model.
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "merges.txt",
                        "chat_template.jinja", "chat_template.json")


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files in ``src`` (or beside it, when it is a file) into ``dst``, so that
    ``load_tokenizer(dst)`` works; returns the names copied (none: there was no tokenizer there)."""
    src = Path(src) if Path(src).is_dir() else Path(src).parent
    copied = []
    for name in (*TOKENIZER_FILES, *TOKENIZER_SIDE_FILES):
        if (src / name).is_file():
            shutil.copy2(src / name, Path(dst) / name)
            copied.append(name)
    return copied


def load_tokenizer(path: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer saved in the local directory ``path`` (never downloads, never runs remote code).

    Raises ``FileNotFoundError`` when ``path`` is not a directory or holds none of ``TOKENIZER_FILES``, and
    ``ValueError`` (chaining transformers' error) when the files are there but do not load.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{str(directory)!r}: tokenizer directory does not exist (or is not a directory)")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{str(directory)!r}: no tokenizer files in this directory (looked for any of {', '.join(TOKENIZER_FILES)})"
        )
    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{str(directory)!r}: could not load a tokenizer: {type(e).__name__}: {e}") from e


def build_bpe_tokenizer(
    texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 512, *, extra_tokens: Sequence[str] = ()
) -> transformers.PreTrainedTokenizerFast:
    """Train a byte-level BPE of at most ``vocab_size`` ids on ``texts``, save it to ``out_dir``, load it back.

    The returned tokenizer is what ``load_tokenizer(out_dir)`` gives, so callers see exactly what a later run that
    loads the directory sees. Special and extra token ids are fixed (module docstring).
    """
    extra = list(extra_tokens)
    clash = [t for t in extra if t in SPECIAL_TOKENS or not t]
    if clash or len(set(extra)) != len(extra):
        raise ValueError(f"extra_tokens must be distinct, non-empty and not one of {SPECIAL_TOKENS}, got {extra}")
    reserved = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS) + len(extra)
    if vocab_size < reserved:
        raise ValueError(f"vocab_size={vocab_size} is below the {reserved} ids that bytes + special/extra tokens need")

    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *extra],  # ids 0.. in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so nothing is ever <unk>
        show_progress=False,
    )
    tok.train_from_iterator((str(t) for t in texts), trainer=trainer)
    if extra:
        # Re-registered as non-special: atomic when encoding, but kept by decode(skip_special_tokens=True).
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra])

    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=UNK_TOKEN, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out))
    return load_tokenizer(out)
