"""Encoder features on disk: a content-keyed cache and a DataModule that serves cached features to probes."""

from medrl.features.cache import CachedFeatures, FeatureCache, feature_key
from medrl.features.datamodule import FeatureDataModule

__all__ = ["CachedFeatures", "FeatureCache", "FeatureDataModule", "feature_key"]
