from setuptools import setup

setup(
    name="improved-diffusion",
    version="0.1.0",
    description="Denoising diffusion models (DDPM, DDIM) in the layout of openai/improved-diffusion",
    packages=["improved_diffusion"],
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.6",
        "numpy",
        "blobfile>=1.0.5",
        "tqdm",
        "pillow",
    ],
    extras_require={
        # MPI launches (mpiexec); the package itself imports without it.
        "mpi": ["mpich", "mpi4py"],
        # Dataset preparation: the bundled digits come from scikit-learn, LSUN from LMDB.
        "datasets": ["scikit-learn", "lmdb"],
        # Evaluation: scipy only checks the Fréchet distance in the tests; the FID Inception-v3 is built in
        # (pytorch-fid needs torchvision, which does not install beside the pinned CPU torch).
        "eval": [],
        # The "tensorboard" log format; plot_progress.py's figures.
        "tensorboard": ["tensorboard"],
        "plot": ["matplotlib"],
        # Checkpoints in the safetensors format (reading .safetensors files, --save_format safetensors,
        # scripts/convert_checkpoint.py).
        "safetensors": ["safetensors"],
        # pytest-xdist spreads the suite over the cores (`make test`), halving its time on two; 3.8 brought
        # --no-loadscope-reorder, which keeps the longest-first order of tests/conftest.py.
        "test": ["pytest", "pytest-xdist>=3.8", "scikit-learn", "lmdb", "mpich", "mpi4py", "scipy", "tensorboard",
                 "matplotlib", "safetensors"],
        "demo": ["scikit-learn"],
    },
)
