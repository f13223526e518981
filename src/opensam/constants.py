"""Constants defined once for the whole package."""

IGNORE_INDEX = 255  # label value for "no class" (void, paper scraps, low-confidence pseudo-labels)
MASK_STORE_FORMAT_VERSION = 1
# The one key of the file stage demo_dino writes in place of weights while model.backbone has no
# DINO (the default): it trains nothing that no stage reads, and loading the file says why.
DEMO_DINO_UNTRAINED_KEY = "opensam_demo_dino_untrained"
