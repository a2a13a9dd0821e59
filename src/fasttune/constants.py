"""Values shared by data/, kernels/, models/, train/ and the API; imports nothing, so every layer can use them."""

# The label of a position that is not a target: torch's cross-entropy default, which transformers and TRL use too.
IGNORE_INDEX = -100

# The processor's video inputs of the vision-language models (models/vision.py), passed as keywords to forward,
# generate and the trainers: Qwen's frames with their grids (and Qwen2.5-VL's seconds per grid), Gemma 4's frames
# with their patch positions and frame counts.
VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "video_position_ids",
              "num_frames_per_video")
# The processor's image inputs: the pixels, and each image's geometry (Qwen's (t, h, w) patch grids; Pixtral's, in
# Mistral 3, (height, width) in pixels; Gemma 4's (x, y) per patch, -1 for padding; Idefics3's tiles' pixel masks).
# Llama 3.2 Vision's (transformers' MllamaProcessor): each image's aspect-ratio id and tile mask, and which tiles
# each text position attends to.
CROSS_KEYS = ("aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")
IMAGE_KEYS = ("pixel_values", "image_grid_thw", "image_sizes", "image_position_ids", "pixel_attention_mask",
              "batch_num_images", *CROSS_KEYS)  # (batch_num_images: LLaVA-OneVision's images per row)
# The processor's audio inputs (Gemma 4 E2B / E4B): log-mel frames (clips, frames, bins) and their mask (clips, frames).
AUDIO_KEYS = ("input_features", "input_features_mask")
# Every media input a vision-language model's forward takes (images, videos, audio): what the objectives pass on.
MEDIA_KEYS = (*IMAGE_KEYS, *VIDEO_KEYS, *AUDIO_KEYS)
