"""Preprocessing: fingerprint, plan, resampling, normalisation, cropping, cache."""
