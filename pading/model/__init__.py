"""The paper's model: the segmenter (Mask2Former), Hungarian matching, class-name semantics,
the primitive generator and its GMMN baseline, the generator-side losses and the retrained
classifiers (docs/method.md)."""
