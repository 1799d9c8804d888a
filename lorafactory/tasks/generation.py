"""Running a causal LM for evaluation: batched greedy decoding with the KV cache, option log-likelihoods for multiple
choice, and mean token cross-entropy.

Sequences are token-id lists (prompts tokenised once, by the task). Batches hold sequences of similar length, left
padded, with position ids counted from each sequence's first real token, so padding and batch size do not change what
a sequence computes (tests check it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Generations:
    texts: list[str]
    """The decoded continuation of each prompt, cut before the first stop string, stripped."""
    token_ids: list[list[int]]
    """The generated token ids of each prompt (up to the end-of-sequence token or the stop string, EOS excluded)."""
    seconds: float

    @property
    def tokens(self) -> list[int]:
        return [len(ids) for ids in self.token_ids]

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens) / self.seconds if self.seconds > 0 else 0.0


def left_padded(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """input_ids, attention_mask and position_ids for sequences padded on the left to the longest."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, positions


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped in batches of similar length (longest first, so a memory problem shows at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    tokenizer: object,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop: Sequence[str] = (),
    batch_size: int = 8,
) -> Generations:
    """Greedy continuation of every prompt: at most `max_new_tokens`, ending at the end-of-sequence token or at the
    first stop string (which is cut off). Sequences that have ended leave the batch (and its KV cache), so one long
    generation does not make the others pay for its length."""
    texts: list[str] = [""] * len(prompts)
    token_ids: list[list[int]] = [[] for _ in prompts]
    start = time.perf_counter()
    for batch in _batches([len(p) for p in prompts], batch_size):
        for i, (text, n) in zip(
            batch, _generate_batch(model, tokenizer, [prompts[i] for i in batch], max_new_tokens, stop), strict=True
        ):
            texts[i], token_ids[i] = text, n
    return Generations(texts, token_ids, time.perf_counter() - start)


def _generate_batch(
    model: nn.Module, tokenizer: object, prompts: list[Sequence[int]], max_new_tokens: int, stop: Sequence[str]
) -> list[tuple[str, list[int]]]:
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, mask, positions = left_padded(prompts, pad)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, next_tokens, positions = out.past_key_values, out.logits[:, -1].argmax(-1), positions[:, -1]
    generated: list[list[int]] = [[] for _ in prompts]
    texts: list[str | None] = [None] * len(prompts)
    alive = list(range(len(prompts)))  # the original row of each row still in the batch
    for _ in range(max_new_tokens):
        keep = []
        for row, i in enumerate(alive):
            token = int(next_tokens[row])
            if token != eos:
                generated[i].append(token)
            text = _until_stop(tokenizer.decode(generated[i], skip_special_tokens=True), stop) if stop else None
            if token == eos or len(generated[i]) >= max_new_tokens or (text is not None and text[1]):
                texts[i] = text[0] if text is not None else None
            else:
                keep.append(row)
        if not keep:
            break
        if len(keep) < len(alive):  # drop the rows that are done, from the KV cache too
            index = torch.tensor(keep)
            cache.batch_select_indices(index)
            mask, positions, next_tokens = mask[index], positions[index], next_tokens[index]
            alive = [alive[row] for row in keep]
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
        positions = positions + 1
        out = model(
            input_ids=next_tokens.unsqueeze(1),
            attention_mask=mask,
            position_ids=positions.unsqueeze(1),
            past_key_values=cache,
            use_cache=True,
        )
        cache, next_tokens = out.past_key_values, out.logits[:, -1].argmax(-1)
    results = []
    for i, tokens in enumerate(generated):
        text = texts[i]
        if text is None:
            text, _ = _until_stop(tokenizer.decode(tokens, skip_special_tokens=True), stop)
        results.append((text, tokens))
    return results


def _until_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` cut before the first stop string that follows some real content, and whether one was found. Leading
    whitespace never stops a generation: a model that starts with a newline has not answered yet."""
    body = text.lstrip()
    cuts = [body.find(s, 1) for s in stop if s and body.find(s, 1) > 0]
    if not cuts:
        return body.strip(), False
    return body[: min(cuts)].strip(), True


@torch.no_grad()
def option_logliks(
    model: nn.Module,
    pad_id: int,
    contexts: Sequence[Sequence[int]],
    options: Sequence[Sequence[Sequence[int]]],
    batch_size: int = 8,
) -> list[list[float]]:
    """log p(option | context), summed over the option's tokens, for every option of every example (as
    lm-evaluation-harness scores multiple choice). Sequences are left padded so that every option ends at the last
    position and only the last few positions' logits are computed."""
    pairs = [
        (i, k, list(contexts[i]) + list(opt), len(opt))
        for i in range(len(contexts))
        for k, opt in enumerate(options[i])
    ]
    scores: list[list[float]] = [[0.0] * len(opts) for opts in options]
    for batch in _batches([len(p[2]) for p in pairs], batch_size):
        sequences = [pairs[j][2] for j in batch]
        ids, mask, positions = left_padded(sequences, pad_id)
        keep = max(pairs[j][3] for j in batch) + 1  # the logits that predict each option token
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position t predicts token t + 1
        for row, j in enumerate(batch):
            i, k, _, n = pairs[j]
            targets = ids[row, -n:]
            scores[i][k] = float(logprobs[row, -n:].gather(-1, targets.unsqueeze(-1)).sum())
    return scores


@torch.no_grad()
def token_nll(
    model: nn.Module,
    pad_id: int,
    sequences: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]] | None = None,
    batch_size: int = 8,
) -> tuple[float, int]:
    """Summed cross-entropy of every predicted token, and how many there were: each token after the first of each
    sequence, or only those whose `labels` entry is not -100 (the response of a prompt-masked example)."""
    total, count = 0.0, 0
    for batch in _batches([len(s) for s in sequences], batch_size):
        ids, mask, positions = left_padded([sequences[j] for j in batch], pad_id)
        target = torch.full_like(ids, -100)
        for row, j in enumerate(batch):
            seq = labels[j] if labels is not None else sequences[j]
            if seq:
                target[row, ids.shape[1] - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        target[mask == 0] = -100
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        loss = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), target[:, 1:].flatten(), ignore_index=-100, reduction="sum"
        )
        total += float(loss)
        count += int((target[:, 1:] != -100).sum())
    return total, count
