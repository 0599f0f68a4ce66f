<<<<<<< HEAD
"""Images as a first-class input: image data, vision encoders, contrastive and image-conditioned LM tasks."""
=======
"""Images as inputs: image data, vision encoders, and the contrastive and image-conditioned tasks."""
>>>>>>> mmclip
