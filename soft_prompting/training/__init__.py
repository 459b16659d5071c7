"""Training the soft prompt: the LightningModule holding the frozen pair, the pipeline shared by
every entrypoint (trainer, datamodule, finishing a fit, provenance), and the Python façade."""
