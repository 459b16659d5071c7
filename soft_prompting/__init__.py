"""soft_prompting: find where two language models behave differently.

A soft prompt is trained to maximise the divergence between a frozen model pair, then turned into
natural-language prompts that expose the difference without it.
"""

__version__ = "0.1.0"
