"""Pure tensor maths: divergences between next-token distributions and the chunked head that
computes them without materialising full-vocabulary logits. Imports nothing of the package."""
