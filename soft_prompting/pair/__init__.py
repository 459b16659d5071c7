"""The frozen model pair: loading (hub ids, local folders, organisms), compatibility checks and
placement over devices. Imports nothing of training."""
