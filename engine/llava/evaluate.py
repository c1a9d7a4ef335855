"""Scores of a model on samples: mean per-token loss per sample, and greedy answers
judged by normalized match. These are what PROGRESS scores its clusters with; the
model's uncertainty on its own greedy answer is what it ranks rows inside a cluster by. EL2N
(mean error-vector norm per answer token) is the static baseline of PROGRESS's table."""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from engine.llava.chat import first_answer
from engine.llava.data import IGNORE, collate, model_inputs, tokenizer_of

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
        ]
    )
}


def _unwrap(model):
    """The module to call ``generate`` on (a DeepSpeed engine wraps it in ``.module``)."""
    return model.module if hasattr(model, "module") and hasattr(model, "backward") else model


def per_sample_loss(model, batch: Mapping[str, Any]):
    """Mean cross-entropy per answer token, per sample: float32 torch (B,) on CPU.

    ``batch`` from ``collate`` with answers. A sample with no answer token (cut by
    max_length) gets NaN. No gradients; the model is put in eval mode.
    """
    import torch

    model.eval()
    with torch.no_grad():
        shift_logits, shift_labels = _shifted_logits(model, batch)
        nll = torch.nn.functional.cross_entropy(
            shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE, reduction="none"
        )  # (B, L-1), 0 where ignored
        counts = (shift_labels != IGNORE).sum(1)
        loss = nll.sum(1) / counts.clamp(min=1)
        loss[counts == 0] = float("nan")
    return loss.cpu()


def _shifted_logits(model, batch: Mapping[str, Any]):
    """Logits at position t paired with the label of token t + 1 (what t predicts):
    float32 torch (B, L-1, V) and int64 (B, L-1), on the model's device. Call under
    no_grad."""
    inputs = model_inputs(batch, model)
    labels = inputs.pop("labels")
    logits = model(**inputs).logits.float()  # (B, L, V)
    return logits[:, :-1], labels[:, 1:]


def per_sample_el2n(model, batch: Mapping[str, Any]):
    """EL2N per sample: the mean over its answer tokens of ||softmax(logits) - onehot||_2,
    float32 torch (B,) on CPU, each in [0, sqrt(2)].

    Paul et al. 2021 score an example by how far the model's prediction is from its
    target; per token here, averaged over the tokens the loss trains (labels != IGNORE),
    so the score does not grow with the answer's length. Only the supervised positions'
    probabilities are formed, (n_answer_tokens, V). ``batch`` from ``collate`` with
    answers; a sample with no answer token gets NaN. No gradients; the model's
    train/eval mode is restored.
    """
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            shift_logits, shift_labels = _shifted_logits(model, batch)
            mask = shift_labels != IGNORE  # (B, L-1)
            rows = mask.nonzero()[:, 0]  # (N,) the sample of each answer token
            err = torch.softmax(shift_logits[mask], dim=-1)  # (N, V)
            target = shift_labels[mask]  # (N,)
            err[torch.arange(len(target), device=err.device), target] -= 1.0
            norms = torch.linalg.vector_norm(err, dim=-1)  # (N,)
            counts = mask.sum(1)
            total = torch.zeros(len(counts), device=norms.device).index_add_(0, rows, norms)
            el2n = total / counts.clamp(min=1)
            el2n[counts == 0] = float("nan")
    finally:
        model.train(was_training)
    return el2n.cpu()


def generate_answers(
    model, batch: Mapping[str, Any], processor, max_new_tokens: int = 25, synced: bool = False
) -> list[str]:
    """Greedy answers of at most ``max_new_tokens`` tokens, one string per sample.

    ``batch`` from ``collate(..., with_answers=False, padding_side='left')``: left padding
    puts every prompt's end at the last column, where generation continues. ``synced``:
    every rank keeps stepping until all ranks are done (ZeRO-3 gathers each layer's
    weights from every rank at every forward, so a rank that stopped early would hang
    the others).
    """
    answers, _ = _greedy(model, batch, processor, max_new_tokens, synced, with_scores=False)
    return answers


def greedy_uncertainty(
    model, batch: Mapping[str, Any], processor, max_new_tokens: int = 25, synced: bool = False
):
    """The model's uncertainty on its own greedy answer: the mean over the answer's
    tokens (its end-of-sequence token included) of -log p(token), float64 (B,) numpy.

    Needs no reference answer: ``batch`` as for ``generate_answers``. 0 is an answer
    the model is sure of at every token; an answer cut at ``max_new_tokens`` counts the
    tokens it has.
    """
    _, nll = _greedy(model, batch, processor, max_new_tokens, synced, with_scores=True)
    return nll


def _greedy(model, batch, processor, max_new_tokens, synced, with_scores):
    """(answers, mean -log p of each answer's tokens float64 (B,) or None)."""
    import torch

    tokenizer = tokenizer_of(processor)
    if batch["attention_mask"][:, -1].min() == 0:
        raise ValueError("generate_answers needs a left-padded batch: collate(padding_side='left')")
    gen_model = _unwrap(model)
    gen_model.eval()
    inputs = model_inputs(batch, model)
    inputs.pop("labels", None)
    with torch.no_grad():
        out = gen_model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=synced,
            output_scores=with_scores,
            return_dict_in_generate=True,
        )
    new = out.sequences[:, inputs["input_ids"].shape[1] :].cpu()
    answers = [s.strip() for s in tokenizer.batch_decode(new, skip_special_tokens=True)]
    if not with_scores:
        return answers, None
    logp = torch.stack([torch.log_softmax(step.float(), -1) for step in out.scores], 1).cpu()
    token_logp = logp.gather(2, new[:, : logp.shape[1], None]).squeeze(2)  # (B, T)
    # a token counts up to and including the first end of sequence; after it is padding
    ended = (new[:, : logp.shape[1]] == tokenizer.eos_token_id).int()
    counted = (ended.cumsum(1) - ended) == 0
    nll = -(token_logp * counted).sum(1) / counted.sum(1).clamp(min=1)
    return answers, nll.double().numpy()


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, number words to digits, squeeze spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(_NUMBER_WORDS.get(w, w) for w in text.split())


def is_match(prediction: str, reference: str) -> bool:
    """Normalized exact match of a generated answer against the reference."""
    return normalize_answer(prediction) == normalize_answer(reference)


def _batches(examples: Sequence[Mapping[str, Any]], size: int):
    for i in range(0, len(examples), size):
        yield examples[i : i + size]


def _per_batch(score, examples, processor, *, max_length, batch_size, blank_images=False):
    """``score(model_batch)`` of every collated chunk of ``examples``, concatenated (None
    when there are none)."""
    out = [
        score(collate(chunk, processor, max_length=max_length, blank_images=blank_images)).numpy()
        for chunk in _batches(examples, batch_size)
    ]
    return np.concatenate(out) if out else None


def sample_losses(
    model,
    processor,
    examples: Sequence[Mapping[str, Any]],
    *,
    max_length: int,
    batch_size: int = 64,
    blank_images: bool = False,
) -> np.ndarray:
    """Mean per-token loss over every assistant turn of each example: float32 (n,), NaN
    where none is left."""
    out = _per_batch(lambda batch: per_sample_loss(model, batch), examples, processor,
                     max_length=max_length, batch_size=batch_size, blank_images=blank_images)  # fmt: skip
    return out if out is not None else np.zeros(0, np.float32)


def sample_el2n(
    model,
    processor,
    examples: Sequence[Mapping[str, Any]],
    *,
    max_length: int,
    batch_size: int = 64,
) -> np.ndarray:
    """EL2N of each example over every assistant turn (``per_sample_el2n``): float64 (n,)
    in [0, sqrt(2)], NaN where no answer token is left after max_length. A low score is
    an example the model already gets right; the data-diet ranking keeps the high ones."""
    out = _per_batch(lambda batch: per_sample_el2n(model, batch), examples, processor,
                     max_length=max_length, batch_size=batch_size)  # fmt: skip
    return out.astype(np.float64) if out is not None else np.zeros(0, np.float64)


def answer_uncertainty(
    model,
    processor,
    examples: Sequence[Mapping[str, Any]],
    *,
    max_length: int,
    batch_size: int = 64,
    max_new_tokens: int = 25,
    synced: bool = False,
) -> np.ndarray:
    """``greedy_uncertainty`` of each example's first question: float64 (n,). Only the
    image and the first question are read (``turns_of(with_answers=False)``): a row's
    answer is never needed, so unselected rows can be scored without revealing it."""
    _, nll = _answer_all(model, processor, examples, max_length=max_length,
                         batch_size=batch_size, max_new_tokens=max_new_tokens,
                         synced=synced, with_scores=True)  # fmt: skip
    return nll


def _answer_all(model, processor, examples, *, max_length, batch_size, max_new_tokens,
                synced, with_scores, blank_images=False):  # fmt: skip
    """Greedy answers of each example's first question, chunk by chunk: (the answers,
    their mean -log p float64 (n,) or None without ``with_scores``)."""
    answers: list[str] = []
    nll: list[np.ndarray] = []
    for chunk in _batches(examples, batch_size):
        batch = collate(chunk, processor, max_length=max_length, with_answers=False,
                        padding_side="left", blank_images=blank_images)  # fmt: skip
        got, scores = _greedy(model, batch, processor, max_new_tokens, synced, with_scores)
        answers += got
        nll.append(scores)
    if not with_scores:
        return answers, None
    return answers, np.concatenate(nll) if nll else np.zeros(0, np.float64)


def answer_correct(
    model,
    processor,
    examples: Sequence[Mapping[str, Any]],
    *,
    max_length: int,
    batch_size: int = 64,
    max_new_tokens: int = 25,
    blank_images: bool = False,
    synced: bool = False,
) -> tuple[np.ndarray, list[str]]:
    """The first turn's greedy answer judged by normalized match against the first
    answer: (bool (n,), the predictions). Later turns are scored by the loss metric only
    (judging turn k would need the model's own earlier answers in the prompt)."""
    preds, _ = _answer_all(model, processor, examples, max_length=max_length,
                           batch_size=batch_size, max_new_tokens=max_new_tokens,
                           synced=synced, with_scores=False, blank_images=blank_images)  # fmt: skip
    correct = np.array(
        [is_match(p, first_answer(ex)) for p, ex in zip(preds, examples, strict=True)]
    )
    return correct.astype(bool), preds
