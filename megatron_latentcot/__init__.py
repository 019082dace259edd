"""megatron-latentcot: Megatron-style pretraining of Llama with token-level adaptive latent CoT."""

import warnings

# megatron-core warns on import that NVIDIA Apex / Transformer Engine are absent; we use
# torch-native ops by design, so the warning is noise in every tool's output.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

__version__ = "0.1.0"
