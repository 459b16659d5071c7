"""Category texts: built-in categories, text folders, Hugging Face datasets, and the Lightning
datamodule that serves them tokenised. Imports nothing of training."""
