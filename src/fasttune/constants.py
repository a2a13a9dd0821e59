"""Values shared by data/, kernels/ and train/; imports nothing, so every layer can use them."""

# The label of a position that is not a target: torch's cross-entropy default, which transformers and TRL use too.
IGNORE_INDEX = -100
