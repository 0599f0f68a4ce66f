"""Images as a first-class input: image data, vision encoders, and the contrastive and image-conditioned tasks."""
