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
        "test": ["pytest", "scikit-learn", "lmdb", "mpich", "mpi4py"],
        "demo": ["scikit-learn"],
    },
)
