"""Constants defined once for the whole package."""

IGNORE_INDEX = 255  # label value for "no class" (void, paper scraps, low-confidence pseudo-labels)
MASK_STORE_FORMAT_VERSION = 1
