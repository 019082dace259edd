from setuptools import find_packages, setup

setup(
    name="megatron-latentcot",
    version="0.1.0",
    description="Megatron-style pretraining of Llama models with token-level adaptive latent CoT",
    packages=find_packages(include=["megatron_latentcot", "megatron_latentcot.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",
        "megatron-core>=0.12",
        "sentencepiece>=0.2",
        "tokenizers>=0.19",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tensorboard>=2.14",
        "zstandard>=0.22",
        "matplotlib>=3.7",  # the latent-steps pictures and FLOPs plots are main outputs
    ],
    extras_require={
        "dev": ["pytest>=8", "ruff>=0.6", "hypothesis>=6", "transformers>=4.45", "safetensors"],
        "wandb": ["wandb"],
        "eval": ["lm-eval>=0.4"],  # the lm-evaluation-harness adapter (megatron_latentcot.eval.lm_eval)
        # parallel.zero=deepspeed (ZeRO-1/2); on CPU install with DS_BUILD_OPS=0 --no-build-isolation
        "deepspeed": ["deepspeed>=0.19.8,<0.20"],
    },
    entry_points={
        "console_scripts": [
            "mlc-pretrain=megatron_latentcot.pretrain:main",
            "mlc-preprocess-data=megatron_latentcot.cli.preprocess_data:main",
            "mlc-merge-datasets=megatron_latentcot.cli.merge_datasets:main",
            "mlc-train-tokenizer=megatron_latentcot.cli.train_tokenizer:main",
            "mlc-prepare-corpus=megatron_latentcot.cli.prepare_corpus:main",
        ],
    },
)
