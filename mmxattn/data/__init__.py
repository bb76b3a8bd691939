"""Data: the embedded shapes data set, real formats (CSV, COCO, WebDataset), transforms and data modules."""

from .formats import CocoCaptionsDataset, CsvDataset, DatasetFormatError, WebDatasetCaptions
from .robust import BadDataError, BadImageError, BrokenSample, SkipTracker, collate_skipping, load_image

__all__ = [
    "BadDataError",
    "BadImageError",
    "BrokenSample",
    "CocoCaptionsDataset",
    "CsvDataset",
    "DatasetFormatError",
    "SkipTracker",
    "WebDatasetCaptions",
    "collate_skipping",
    "load_image",
]
