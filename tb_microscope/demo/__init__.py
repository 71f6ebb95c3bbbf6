"""The demo: a generated image data set and a small CNN that learns recognizable features."""
