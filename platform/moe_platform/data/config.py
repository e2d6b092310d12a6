"""DataConfig: the `data` section of the job config (jobs/conf/config.yaml).

`data.input` and `data.dataset_dir` are the public contract every job shares:
prepare reads `input` and writes `dataset_dir`; training, tuning and
evaluation read `dataset_dir`. Validation runs in __post_init__ and names the
key, so a bad value fails before Ray starts.
"""
from __future__ import annotations

import json

from dataclasses import asdict, dataclass, field, replace
from typing import Any, List, Optional

from moe.configs import require

# Byte-level BPE starts from all 256 byte values; a vocabulary must hold those plus the specials.
BYTE_ALPHABET_SIZE = 256
SUPPORTED_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".jsonl", ".parquet")
# data.kind: "text" (documents; every token counts) or "instruction" (prompt/response records
# for finetuning; only response tokens count, marked by a loss_mask column).
KINDS = ("text", "instruction")
INSTRUCTION_EXTENSIONS = (".jsonl", ".parquet")
# Config keys that only instruction data reads (prepare leaves them out of a text dataset's fingerprint).
INSTRUCTION_KEYS = ("kind", "prompt_field", "response_field", "prompt_template")
# The built-in corpus (data.input unset) is the interpreter's standard library; this cap keeps
# `make run` and smoke runs to seconds. An explicit data.input has no cap unless one is set.
DEFAULT_CORPUS_MAX_BYTES = 4_000_000


@dataclass
class DataConfig:
    # Raw corpus: a file, a directory (recursive), a glob, or a URI (s3://, gs://).
    # Unset: the Python standard library's .py sources (a corpus every machine has), or with
    # kind=instruction a prompt/response set generated from them (moe_platform/data/instructions.py).
    input: Optional[str] = None
    # "text": documents, every token is trained on. "instruction": .jsonl/.parquet records with a
    # prompt and a response; rows get a loss_mask column that is 1 on response tokens (and the eos).
    kind: str = "text"
    # Where the tokenizer, Parquet shards and manifest.json go (and where other jobs read them).
    dataset_dir: str = "outputs/dataset"
    # An existing tokenizer.json to reuse; unset: train a byte-level BPE on the corpus.
    tokenizer: Optional[str] = None
    vocab_size: int = 4096
    eos_token: str = "<|endoftext|>"
    pad_token: str = "<|pad|>"
    # Each row holds seq_len + 1 tokens (inputs plus the shifted target).
    seq_len: int = 256
    # Fraction of documents that go to the validation split, chosen by a hash of each
    # document's identity (so a document keeps its split when others are added).
    validation_fraction: float = 0.05
    split_seed: int = 0
    # File types read from directories and globs, and where .jsonl/.parquet keep their text.
    extensions: List[str] = field(default_factory=lambda: list(SUPPORTED_EXTENSIONS))
    text_field: str = "text"  # .jsonl: key of each line's JSON object
    text_column: str = "text"  # .parquet: string column
    # kind=instruction: the .jsonl keys (and .parquet string columns) of the prompt and the response,
    # and how the prompt is rendered before the response ("{prompt}" is replaced; other text is literal).
    # Serve the finetuned model with the same rendering.
    prompt_field: str = "prompt"
    response_field: str = "response"
    prompt_template: str = "{prompt}\n"
    # Caps, in the corpus' sorted order (None = no cap; the built-in corpus defaults to
    # DEFAULT_CORPUS_MAX_BYTES). max_bytes counts whole input files.
    max_documents: Optional[int] = None
    max_bytes: Optional[int] = None
    # Text used to train the tokenizer (a deterministic spread of files, not just the first ones).
    tokenizer_train_bytes: int = 50_000_000
    min_frequency: int = 2
    # Output shards: rows per Parquet file and per row group (the unit a reader streams).
    shard_rows: int = 8192
    row_group_rows: int = 1024
    # Ray Data: input files per tokenize task, and CPUs per task. Fractional CPUs keep
    # a fully booked cluster from starving Ray Data (docs/ray-notes.md, Data -> Train).
    files_per_task: int = 16
    num_cpus_per_task: float = 0.5
    # Replace a dataset_dir that holds a different dataset (or rewrite the same one).
    overwrite: bool = False

    def __post_init__(self) -> None:
        require(bool(self.dataset_dir), "data.dataset_dir must not be empty")
        require(self.seq_len >= 2, f"data.seq_len must be >= 2 (a row needs an input and a target), got {self.seq_len}")
        minimum_vocab = BYTE_ALPHABET_SIZE + len(self.special_tokens)
        require(
            self.vocab_size >= minimum_vocab,
            f"data.vocab_size must be >= {minimum_vocab} (256 byte tokens + {len(self.special_tokens)} special tokens), "
            f"got {self.vocab_size}",
        )
        require(bool(self.eos_token), "data.eos_token must not be empty")
        require(bool(self.pad_token), "data.pad_token must not be empty")
        require(self.eos_token != self.pad_token, "data.pad_token must differ from data.eos_token")
        require(
            0.0 <= self.validation_fraction < 1.0,
            f"data.validation_fraction must be in [0, 1), got {self.validation_fraction}",
        )
        for ext in self.extensions:
            require(
                ext in SUPPORTED_EXTENSIONS,
                f"data.extensions: {ext!r} is not supported (supported: {', '.join(SUPPORTED_EXTENSIONS)})",
            )
        require(bool(self.extensions), "data.extensions must not be empty")
        require(bool(self.text_field), "data.text_field must not be empty")
        require(bool(self.text_column), "data.text_column must not be empty")
        require(self.kind in KINDS, f"data.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        require(bool(self.prompt_field), "data.prompt_field must not be empty")
        require(bool(self.response_field), "data.response_field must not be empty")
        require(self.prompt_field != self.response_field,
                 f"data.response_field must differ from data.prompt_field (both {self.prompt_field!r})")
        require("{prompt}" in self.prompt_template,
                 f"data.prompt_template must contain {{prompt}} (where the prompt goes), got {self.prompt_template!r}")
        require(
            self.kind != "instruction" or bool(self.input_extensions),
            f"data.extensions must include .jsonl or .parquet with data.kind=instruction, got {self.extensions}",
        )
        for key in ("max_documents", "max_bytes"):
            value = getattr(self, key)
            require(value is None or value >= 0, f"data.{key} must be >= 0 (0 or null: no cap), got {value}")
        require(self.tokenizer_train_bytes > 0, f"data.tokenizer_train_bytes must be > 0, got {self.tokenizer_train_bytes}")
        require(self.min_frequency >= 1, f"data.min_frequency must be >= 1, got {self.min_frequency}")
        require(self.shard_rows >= 1, f"data.shard_rows must be >= 1, got {self.shard_rows}")
        require(self.row_group_rows >= 1, f"data.row_group_rows must be >= 1, got {self.row_group_rows}")
        require(self.files_per_task >= 1, f"data.files_per_task must be >= 1, got {self.files_per_task}")
        require(self.num_cpus_per_task > 0, f"data.num_cpus_per_task must be > 0, got {self.num_cpus_per_task}")

    @property
    def special_tokens(self) -> list[str]:
        """In id order: eos gets id 0 and pad id 1 in a trained tokenizer."""
        return [self.eos_token, self.pad_token]

    @property
    def row_len(self) -> int:
        return self.seq_len + 1

    @property
    def input_extensions(self) -> tuple[str, ...]:
        """File types read from directories and globs: instruction records live in .jsonl/.parquet only."""
        if self.kind == "instruction":
            return tuple(ext for ext in self.extensions if ext in INSTRUCTION_EXTENSIONS)
        return tuple(self.extensions)

    def resolved(self) -> DataConfig:
        """Local paths made absolute (Ray workers run in other cwds); URIs unchanged.

        Call once at the entry point; resolving twice changes nothing.
        """
        from moe_platform.data.storage import absolute

        return replace(
            self,
            input=absolute(self.input) if self.input else None,
            dataset_dir=absolute(self.dataset_dir),
            tokenizer=absolute(self.tokenizer) if self.tokenizer else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def render_prompt(template: str, prompt: str) -> str:
    """The prompt as the model sees it: data.prompt_template with "{prompt}" replaced.

    str.replace, not str.format: braces elsewhere in the template or in a prompt stay literal.
    """
    return template.replace("{prompt}", prompt)


def chat_template(template: str) -> str:
    """data.prompt_template as a Jinja chat template (tokenizer_config.json's "chat_template"):
    system and user turns rendered through the template in order, each assistant turn followed by
    eos, so the generation prompt is the template's text after {prompt} of the last user turn."""
    before, after = (json.dumps(part) for part in template.split("{prompt}", 1))
    return ("{%- for message in messages -%}"
            "{%- if message['role'] == 'assistant' -%}{{ message['content'] }}{{ eos_token }}"
            "{%- else -%}{{ " + before + " }}{{ message['content'] }}{{ " + after + " }}"
            "{%- endif -%}{%- endfor -%}")

