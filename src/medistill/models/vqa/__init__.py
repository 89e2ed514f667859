"""Med-VQA models (AMiF, METHODS.md section 2) and their answer vocabulary."""

from medistill.models.vqa.vocab import AnswerVocabulary, answers_fingerprint

__all__ = ["AnswerVocabulary", "answers_fingerprint"]
