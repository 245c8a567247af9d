"""phi3-lora: fine-tune Microsoft's Phi-3 models with LoRA / QLoRA in a plain Accelerate loop."""

from setuptools import find_packages, setup

setup(
    name="phi3-lora",
    version="0.1.0",
    description="Fine-tune Phi-3 with LoRA or 4-bit QLoRA: one readable Accelerate loop, DeepSpeed ZeRO, "
                "checked adapter checkpoints.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["phi3_lora", "phi3_lora.*"]),
    # Below the next major versions: this code follows some of their internals (peft's adapter-input casts,
    # bitsandbytes' CPU kernel switch, accelerate's launcher), each checked by a test at the versions in use.
    install_requires=[
        "torch>=2.5",  # flex attention, is_bf16_supported(including_emulation=)
        "accelerate>=1.10,<2",
        "transformers>=5.0,<6",
        "peft>=0.17,<1",
        "datasets>=3.0,<6",
        "safetensors>=0.4",
        "tensorboard>=2.15",
        "loralib>=0.1.2",
        "pyyaml>=6.0",
        "tqdm>=4.66",
    ],
    extras_require={
        "qlora": ["bitsandbytes>=0.45,<1"],
        "deepspeed": ["deepspeed>=0.16,<1"],
        "bench": ["trl>=0.20,<2", "bitsandbytes>=0.45,<1"],  # benchmarks/: trl's SFTTrainer side, QLoRA runs
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "bitsandbytes>=0.45,<1", "deepspeed>=0.16,<1", "trl>=0.20,<2"],
    },
)
