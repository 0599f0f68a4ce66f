"""Images as inputs: image data, vision encoders, and the contrastive and image-conditioned tasks."""
