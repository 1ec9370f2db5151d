"""``sdcore batch``: many images from a prompts file, on one device or a Ray cluster, resumable.

prompts  the prompts file (.txt or .jsonl), checked whole, expanded into images with stable names and seeds
store    the output folder: batch.json, the images, the manifest; atomic writes, resume
worker   loads the pipeline once and turns groups of images into PNGs (in-process or as a Ray actor)
driver   the driver: engines, progress, summary"""
from .driver import run

__all__ = ["run"]
