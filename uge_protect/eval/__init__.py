"""Evaluation: train models on protected and on clean data and compare them on clean test data.

``classify`` (classifier zoo, per-epoch accuracy), ``defenses`` (grayscale, JPEG, cutout, mixup,
strong augmentation, adversarial training, partial protection), ``metrics``, ``report``
(report.json / report.md / figures), ``runner`` (:func:`run_evaluation`), ``clip`` (CLIP
training and retrieval metrics).
"""
