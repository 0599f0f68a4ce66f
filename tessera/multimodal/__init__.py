"""Images as a first-class input: image data, vision encoders, contrastive and image-conditioned LM tasks."""
