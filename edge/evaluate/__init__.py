"""Evaluation: metrics, data loaders and folds, the z-score baseline, heatmaps, ``edge eval``.

Office work only; the vehicle imports at most :mod:`edge.evaluate.heatmaps` (alarm PNGs).
"""
