"""Beam search over any step-by-step decoder, scored and stopped exactly as transformers' ``generate`` does it.

ViT-GPT2 decodes through transformers' ``generate``; Show-Attend-Tell's LSTM needs its own loop. For ``num_beams`` to
mean the same thing for both, this loop reproduces transformers' beam search (``GenerationMixin._beam_search``, 4.57):

* each step keeps the ``2 · num_beams`` best continuations of all open hypotheses (summed log-probabilities); the
  best ``num_beams`` of them that do not end stay open;
* a continuation ends with EOS or at ``max_new_tokens``; if it is among the first ``num_beams`` of the step it joins
  the kept captions with score ``sum_logprobs / length ** length_penalty``, the length counting generated tokens
  with EOS (the start token excluded), and the ``num_beams`` best-scored captions are kept;
* with ``early_stopping=False`` an image is done once it keeps ``num_beams`` captions and its best open hypothesis,
  divided by the current length ** ``length_penalty``, does not beat the worst kept one; with ``True`` it is done as
  soon as it keeps ``num_beams`` captions.

The -1e9 scores are transformers' own masking constant: using the same one keeps ties and orderings identical.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from datamodules.errors import RobucapError
from modules.captioners.base import BEAM_EARLY_STOPPING, BEAM_LENGTH_PENALTY

# transformers' score for "not a candidate" (finite, so masked scores can still be added to and compared).
MASKED = -1.0e9

DecoderState = tuple[torch.Tensor, ...]
StepFn = Callable[[torch.Tensor, DecoderState], tuple[torch.Tensor, DecoderState]]


@dataclass(frozen=True)
class BeamSearchResult:
    """The best caption of each image.

    Attributes:
        sequences: Token ids without the start token, pad after EOS, as long as the longest caption of the batch.
            Shape: ``(B, T)``.
        scores: ``sum_logprobs / length ** length_penalty`` of each caption (transformers' ``sequences_scores``).
            Shape: ``(B,)``.
        lengths: Generated tokens of each caption, EOS included. Shape: ``(B,)``.
    """

    sequences: torch.Tensor
    scores: torch.Tensor
    lengths: torch.Tensor


def _gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[b, index[b, j]]`` along dim 1, for values of shape ``(B, N)`` or ``(B, N, T)``.

    Shape:
        ``index``: ``(B, M)``; out: ``(B, M)`` or ``(B, M, T)``.
    """
    if values.dim() == 3:
        index = index.unsqueeze(2).expand(-1, -1, values.shape[2])
    return values.gather(1, index)


def beam_search(
    step: StepFn,
    state: DecoderState,
    batch_size: int,
    num_beams: int,
    max_new_tokens: int,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    length_penalty: float = BEAM_LENGTH_PENALTY,
    early_stopping: bool = BEAM_EARLY_STOPPING,
) -> BeamSearchResult:
    """Length-normalised beam search with transformers' scoring and stopping rules (see the module docstring).

    Args:
        step: ``(previous tokens, state) -> (next-token log-probabilities, new state)`` for ``B · num_beams`` rows,
            image-major (rows ``b · num_beams ... b · num_beams + num_beams - 1`` belong to image ``b``).
            Shapes: tokens ``(B·K,)``, log-probabilities ``(B·K, V)``.
        state: The decoder state after the start token; every tensor has ``B · num_beams`` rows, reordered by
            indexing along dim 0 as hypotheses move between beams.
        batch_size: Number of images ``B``.
        num_beams: Hypotheses per image ``K``.
        max_new_tokens: Longest caption in tokens, EOS included.
        bos_token_id: Start token fed at the first step.
        eos_token_id: Token that ends a caption.
        pad_token_id: Filler after EOS.
        length_penalty: Exponent of the length in the score (0: summed log-probabilities).
        early_stopping: Stop an image as soon as it keeps ``num_beams`` captions.

    Returns:
        The best caption of each image, its score and its length.

    Raises:
        RobucapError: ``num_beams`` or ``max_new_tokens`` below 1.
    """
    if num_beams < 1:
        raise RobucapError(f"num_beams must be >= 1, got {num_beams}")
    if max_new_tokens < 1:
        raise RobucapError(f"max_new_tokens must be >= 1 for beam search, got {max_new_tokens}")
    k = num_beams
    device = state[0].device if state else torch.device("cpu")
    tokens = torch.full((batch_size * k,), bos_token_id, dtype=torch.long, device=device)
    # Only the first copy of each image's start is live, so step 1 does not fill the beam with duplicates.
    running_scores = torch.zeros(batch_size, k, device=device)
    running_scores[:, 1:] = MASKED
    running = torch.full((batch_size, k, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    kept = running.clone()
    kept_scores = torch.full((batch_size, k), MASKED, device=device)
    kept_lengths = torch.zeros(batch_size, k, dtype=torch.long, device=device)
    is_kept = torch.zeros(batch_size, k, dtype=torch.bool, device=device)
    # Per image: could an open hypothesis still beat the worst kept caption? Once False, the image is done.
    improvable = torch.ones(batch_size, 1, dtype=torch.bool, device=device)
    offsets = (torch.arange(batch_size, device=device) * k).unsqueeze(1)
    for length in range(1, max_new_tokens + 1):
        log_probs, state = step(tokens, state)
        vocab_size = log_probs.shape[-1]
        totals = (log_probs.float().view(batch_size, k, vocab_size) + running_scores.unsqueeze(2)).view(batch_size, -1)
        # 2K candidates, so that K open hypotheses remain even if the best K all end here.
        candidate_scores, flat = totals.topk(min(2 * k, k * vocab_size), dim=1)
        parent, word = flat.div(vocab_size, rounding_mode="floor"), flat.remainder(vocab_size)
        candidates = _gather(running, parent).clone()
        candidates[:, :, length - 1] = word
        ends = word.eq(eos_token_id) | (length == max_new_tokens)

        # Open hypotheses for the next step: the best K candidates that did not end.
        open_scores = candidate_scores + ends.float() * MASKED
        best_open = open_scores.topk(k, dim=1).indices
        running_scores = _gather(open_scores, best_open)
        running = _gather(candidates, best_open)
        tokens = _gather(word, best_open).flatten()
        rows = (offsets + _gather(parent, best_open)).flatten()
        state = tuple(tensor[rows] for tensor in state)

        # Kept captions: only candidates ranked in the step's top K may join, and only while the image is not done.
        in_top_k = torch.arange(candidates.shape[1], device=device).lt(k).unsqueeze(0)
        joining = ends & in_top_k
        scores = candidate_scores / (length**length_penalty)
        full = is_kept.all(dim=1, keepdim=True) & early_stopping
        scores = scores + full.float() * MASKED + (~improvable).float() * MASKED + (~joining).float() * MASKED
        merged_scores = torch.cat([kept_scores, scores], dim=1)
        best_kept = merged_scores.topk(k, dim=1).indices
        kept_scores = _gather(merged_scores, best_kept)
        kept = _gather(torch.cat([kept, candidates], dim=1), best_kept)
        kept_lengths = _gather(torch.cat([kept_lengths, torch.full_like(word, length)], dim=1), best_kept)
        is_kept = _gather(torch.cat([is_kept, joining], dim=1), best_kept)

        # transformers' heuristic: the best open hypothesis, normalised at the current length, against the worst kept.
        best_possible = running_scores[:, :1] / (length**length_penalty)
        worst_kept = torch.where(is_kept, kept_scores.min(dim=1, keepdim=True).values, MASKED)
        improvable = improvable & (best_possible > worst_kept).any(dim=1, keepdim=True)
        if not improvable.any() or (early_stopping and is_kept.all()) or ends.all():
            break
    lengths = kept_lengths[:, 0]
    return BeamSearchResult(sequences=kept[:, 0, : int(lengths.max())], scores=kept_scores[:, 0], lengths=lengths)
