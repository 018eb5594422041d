"""lmlab: a JAX/Flax research framework for dense and Mixture-of-Experts language models."""
from setuptools import find_packages, setup

setup(
    name='lmlab',
    version='0.1.0',
    description='JAX/Flax language-model experiments: dense and MoE transformers, sharded training, fine-tuning.',
    python_requires='>=3.11',
    packages=find_packages(include=['lmlab', 'lmlab.*', 'experiments', 'experiments.*']),
    install_requires=[
        'jax>=0.10.2', 'flax>=0.12.8', 'optax>=0.2.8', 'orbax-checkpoint>=0.12.8', 'ml_collections>=1.1.0',
        'absl-py>=2.5', 'numpy>=2.0', 'tensorboardX>=2.6', 'matplotlib>=3.9', 'tqdm>=4.66', 'tokenizers>=0.20',
        'safetensors>=0.4', 'gguf>=0.19', 'sentencepiece>=0.2', 'jinja2>=3.1',
    ],
    extras_require={
        'cuda': ['jax[cuda12]>=0.10.2'],
        'tpu': ['jax[tpu]>=0.10.2'],
        'tfds': ['tensorflow-datasets>=4.9', 'array_record>=0.8'],
        'tf': ['tensorflow-cpu>=2.18', 'tensorflow-datasets>=4.9'],
        'test': ['pytest>=8', 'pytest-xdist>=3.5', 'tensorflow-datasets>=4.9', 'array_record>=0.8', 'ray>=2.40',
                 'submitit>=1.5', 'lm-eval>=0.4.9', 'scipy>=1.11', 'playwright>=1.49', 'flask>=3.0'],
        'review': ['flask>=3.0'],
        'sweep': ['ray>=2.40', 'submitit>=1.5'],
        'eval': ['lm-eval>=0.4.9'],
        'parity': ['torch==2.13.0', 'transformers>=4.50', 'accelerate>=1.0'],
    },
)
