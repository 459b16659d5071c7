"""From a trained soft prompt to real text: candidate strategies, paired sampling and scoring without
the soft prompt, and the divergent dataset written to the run directory."""
