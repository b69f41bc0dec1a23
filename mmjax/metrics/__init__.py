"""Metrics: pure functions plus accumulators that merge across batches and hosts.

- `vqa`: official VQA answer normalisation and accuracy; exact match.
- `caption`: BLEU-1..4, ROUGE-L, CIDEr-D with pycocoevalcap's semantics.
- `retrieval`: recall@K both ways from a similarity matrix.
- `classification`: accuracy and confusion matrix.
- `accumulate`: the accumulator base class and a weighted mean.
"""

from mmjax.metrics.accumulate import Accumulator, Mean, MeanBase, select_items
from mmjax.metrics.caption import CaptionMetrics, bleu, cider_d, rouge_l, simple_tokenize
from mmjax.metrics.classification import ConfusionMatrix, accuracy, confusion_matrix
from mmjax.metrics.retrieval import Retrieval, recall_at_k, retrieval_ranks
from mmjax.metrics.vqa import (ExactMatch, VQAAccuracy, exact_match, majority_answers, normalize_answer,
                               vqa_accuracies, vqa_accuracy)

__all__ = [
    "Accumulator", "CaptionMetrics", "ConfusionMatrix", "ExactMatch", "Mean", "MeanBase", "Retrieval",
    "VQAAccuracy", "accuracy", "bleu", "cider_d", "confusion_matrix", "exact_match", "majority_answers",
    "normalize_answer",
    "recall_at_k", "retrieval_ranks", "rouge_l", "select_items", "simple_tokenize", "vqa_accuracies",
    "vqa_accuracy",
]
