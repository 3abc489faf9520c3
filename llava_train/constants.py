"""Names used across the package, defined once."""

IGNORE_INDEX = -100
"""Label value that the loss ignores (system, user, scaffolding, image and padding tokens)."""

IMAGE_TOKEN = "<image>"
"""Placeholder for one image in conversation text; expanded to the image's feature count."""

# Keys of a tokenised example and of a collated batch.
INPUT_IDS = "input_ids"
LABELS = "labels"
ATTENTION_MASK = "attention_mask"
PIXEL_VALUES = "pixel_values"
IMAGE_SIZES = "image_sizes"
