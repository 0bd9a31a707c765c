"""align: SFT, reward modeling, PPO, DPO and RLOO/GRPO for decoder-only language models."""

import logging

__version__ = "0.1.0"

# bitsandbytes warns on every CPU import that an optional kernels package is missing; harmless.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
