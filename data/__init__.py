"""Data: dataset builders, input pipelines, video decoding, conversation templates."""
