"""vitscale: ViT and CLIP pre-training at supercomputer scale on DeepSpeed."""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="vitscale",
    version="0.1.0",
    description="3D-parallel ViT / CLIP pre-training on DeepSpeed with synthetic and LAION-style data",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The top-level ds_configs/ and configs/ ship as the data-only packages vitscale/ds_configs/
    # and vitscale/configs/ (package_dir maps them), so a non-editable install finds the presets;
    # vitscale.config looks in both places. tests/test_packaging.py checks the wheel.
    packages=find_packages(include=["vitscale", "vitscale.*"]) + ["vitscale.ds_configs", "vitscale.configs"],
    package_dir={"vitscale.ds_configs": "ds_configs", "vitscale.configs": "configs"},
    package_data={"vitscale.ds_configs": ["*.json"], "vitscale.configs": ["*.yaml"]},
    install_requires=[
        "torch>=2.4,<2.16",  # admits 2.14.1; users bring their own CUDA builds
        "torchvision>=0.19,<0.31",  # admits 0.29.1
        "deepspeed>=0.16",
        "timm>=1.0.16",  # local-dir: folders (vitscale-export --to timm --out DIR)
        "open_clip_torch>=2.32",  # local-dir: folders (vitscale-export --to open_clip --out DIR)
        "webdataset>=0.2.86",
        "simplejpeg>=1.7",  # image-text loader's JPEG decoder (benchmarks/loader_speed.py)
        "tokenizers>=0.19",  # OpenAI's BPE ids at loader speed (data/clip_bpe.py)
        "ftfy",  # caption cleaning as open_clip's tokenizer does it (data/clip_bpe.py)
        "regex",  # CLIP's pre-tokenisation pattern with \\p{L} / \\p{N} (data/clip_bpe.py)
        "pyarrow",  # img2dataset's per-shard .parquet (vitscale-synth laion-sample)
        "numba>=0.59",
        "numpy",
        "pyyaml",
        "safetensors",
        "tqdm",
        "tensorboard",  # log.tensorboard (train/monitors.py)
        "matplotlib",  # vitscale-scaling's plot
        "scipy",  # vitscale-fit's L-BFGS
        "scikit-learn",  # the built-in digits fine-tuning set, the linear probe's logistic regression
    ],
    extras_require={
        "test": ["pytest>=7", "wandb"],  # wandb: the tests run log.wandb offline
        "mpi": ["mpi4py>=3.1", "mpich"],
        "wandb": ["wandb"],  # log.wandb (train/monitors.py)
        "dev": ["pytest>=7", "mpi4py>=3.1", "mpich"],
    },
    entry_points={"console_scripts": ["vitscale-train=vitscale.train.__main__:main",
                                     "vitscale-synth=vitscale.tools.synth:main",
                                     "vitscale-export=vitscale.tools.export:main",
                                     "vitscale-eval=vitscale.tools.eval:main",
                                     "vitscale-scaling=vitscale.tools.scaling:main",
                                     "vitscale-sweep=vitscale.tools.sweep:main",
                                     "vitscale-recipe=vitscale.tools.recipe:main",
                                     "vitscale-plot=vitscale.tools.plot:main",
                                     "vitscale-rehearse=vitscale.tools.rehearse:main",
                                     "vitscale-fit=vitscale.tools.fit:main",
                                     "vitscale-plan=vitscale.tools.plan:main"]},
)
