"""SAM2 in Flax NNX: image path (Hiera, FPN neck, prompt encoder, mask decoder) and memory path (memory encoder,
memory attention, object pointers)."""
