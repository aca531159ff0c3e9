"""Defences against poisoned training data."""

from modules.defenses.spectral import encoder_features, ranking_quality, spectral_signature_scores

__all__ = ["encoder_features", "ranking_quality", "spectral_signature_scores"]
