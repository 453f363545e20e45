"""mycodist: distributed training framework for mushroom photo classification."""

from pathlib import Path

from setuptools import Extension, find_packages, setup

HERE = Path(__file__).parent
version = {}
exec((HERE / "mycodist" / "__init__.py").read_text(), version)

setup(
    name="mycodist",
    version=version["__version__"],
    description="Crawl, shard, stream, train (Accelerate/DeepSpeed) and serve a mushroom photo classifier",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mycodist", "mycodist.*"]),
    # Decodes only a training crop's region of a JPEG (mycodist/data/decode.py). Optional: it needs a C compiler
    # and libjpeg-turbo's headers (Debian/Ubuntu: apt-get install libjpeg62-turbo-dev or libjpeg-turbo8-dev);
    # without them the install goes on and the loader decodes whole images with simplejpeg.
    # The crop's resize (mycodist/data/_resample.c): optional too (a C compiler); without it Pillow resizes.
    ext_modules=[Extension("mycodist.data._jpegregion", ["mycodist/data/_jpegregion.c"],
                           libraries=["jpeg"], optional=True),
                 Extension("mycodist.data._resample", ["mycodist/data/_resample.c"],
                           extra_compile_args=["-O3"], optional=True)],
    package_data={"mycodist": ["serve/static/*", "reference/*.csv"]},
    data_files=[
        ("share/mycodist/configs", [str(p.relative_to(HERE)) for p in (HERE / "configs").glob("*.yaml")]),
        ("share/mycodist/configs/accelerate", [str(p.relative_to(HERE)) for p in (HERE / "configs" / "accelerate").glob("*.yaml")]),
        ("share/mycodist/configs/deepspeed", [str(p.relative_to(HERE)) for p in (HERE / "configs" / "deepspeed").glob("*.json")]),
    ],
    # torch is not pinned: the Makefile installs the CPU wheel on CPU machines and keeps a CUDA
    # build a user already has (docs/install.md).
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "pillow>=10",
        "simplejpeg>=1.7",  # train-crop JPEG decoding (libjpeg-turbo wheel); Pillow is the fallback
        "omegaconf>=2.3",
        "webdataset>=0.2.86",
        "braceexpand>=0.1.7",
        "fsspec>=2023.1",
        "aiohttp>=3.9",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "safetensors>=0.4",
        "tensorboard>=2.14",
        "accelerate>=1.0",
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.15"],
        # `mycodist export --onnx` and serve.runtime=onnxruntime (docs/serving.md); CPU wheels, no torch pulled
        "onnx": ["onnx>=1.16", "onnxruntime>=1.18"],
        # CUDA machines only; never installed by CI (it compiles against CUDA).
        "flash": ["flash-attn>=2.5"],
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "ruff>=0.5",
            "hypothesis>=6.100",
            "pyarrow>=14",
            "playwright>=1.40",
        ],
    },
    entry_points={"console_scripts": ["mycodist=mycodist.cli:entry"]},
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
