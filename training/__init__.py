"""The draft trainer: SFT, distillation and DPO for rss_jax models (Flax NNX + optax), with Orbax checkpoints.

    from training import TrainConfig, train, dpo_loss, make_draft
    result = train(TrainConfig(mode="dpo", policy="drafts/sft", data="pairs.jsonl", output="runs/dpo", steps=200))
    rss_jax.load("runs/dpo/final")          # the exported draft

Losses follow docs/algorithms.md §9; the command line is `rss-jax train sft|distill|dpo` (training/cli.py).
"""
from training.data import DataError, Dataset, ExampleStream, build_dataset, read_jsonl  # noqa: F401
from training.draft import (draft_vocabulary, frequent_token_ids, make_draft, parse_layers,  # noqa: F401
                            trim_vocab)
from training.losses import (acceptance, distill_sum, dpo_loss, masked_ce_sum, sequence_logps,  # noqa: F401
                             token_logps)
from training.trainer import (TrainConfig, TrainResult, check_same_vocabulary, lr_schedule,  # noqa: F401
                              model_logits, pair_logps, precompute_reference, train)
from training.checkpoint import CheckpointMismatch, latest_checkpoint  # noqa: F401
