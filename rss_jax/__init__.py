"""rss_jax: reward-shifted speculative sampling and the test-time alignment methods it is measured against."""
from rss_jax import heads, rewards, sampling, sharding  # noqa: F401
from rss_jax import engine  # noqa: F401,E402
from rss_jax.lm import LM, load, from_params  # noqa: F401
from rss_jax.loading import enable_compile_cache  # noqa: F401

__version__ = "0.1.0"
from rss_jax.decoding import generate  # noqa: F401,E402
from rss_jax.decoding.best_of_n import best_of_n  # noqa: F401,E402
from rss_jax.decoding.speculative_rejection import speculative_rejection  # noqa: F401,E402
from rss_jax.decoding.gsi import gsi  # noqa: F401,E402
from rss_jax.decoding.rsd import rsd  # noqa: F401,E402
from rss_jax.decoding.args import args  # noqa: F401,E402
from rss_jax.decoding.cards import cards, rejection_sampling  # noqa: F401,E402
from rss_jax.decoding.treebon import treebon  # noqa: F401,E402
