"""The default zoo: SmolLM2-135M-Instruct and two experts fine-tuned from it on distinct skills
(arithmetic; numbers in French words) that a third task (arithmetic answered in French words)
needs both of. See ``workbench.zoo.build``."""
