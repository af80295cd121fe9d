"""Task heads: region (box), temporal (CG-DETR) and mask (SAM2 prompt)."""
