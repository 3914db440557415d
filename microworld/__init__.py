"""A procedural micro world with its own tiny text-to-image model, CLIP and identity encoder."""
