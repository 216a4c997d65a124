"""The features stage: image and text vectors for every row of the prepared manifest, through the cache."""

from fusionops.features.extract import FeatureSet, extract_features, load_features

__all__ = ["FeatureSet", "extract_features", "load_features"]
