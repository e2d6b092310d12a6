"""Moved to testkit (tests/testkit/): import from there. This alias stays only so that branches
written against the old module still import; delete it once nothing does."""
from testkit.datasets import progression_rows, write_dataset, write_tokenizer  # noqa: F401
from testkit.models import SEQ_LEN, VOCAB_SIZE, tiny_model  # noqa: F401
from testkit.training import event_accumulator, read_json, read_scalars, replace_trainer, tiny_stage  # noqa: F401
