"""The prepare pipeline: corpus -> tokenizer -> Ray Data tokenization -> packed shards -> manifest.

    driver                                      Ray Data tasks (fractional CPUs)
    ------                                      --------------------------------
    find files, fingerprint, check dataset_dir
    train (or load) the tokenizer on a sample
    from_items(files) ────────────────────────▶ read documents, pick split by hash,
                                                 encode + eos   (or a skip: path, reason)
                                                 (instructions: + a loss mask, 1 on the response)
    iterate blocks in file order ◀────────────
    pack rows per split, write zstd shards
    manifest.json last

Tokenizing is the expensive part and runs in parallel; packing on the driver is a
numpy reshape and a Parquet write per shard. Ray Data runs with preserve_order,
so the driver sees documents in sorted-file order and the shards are
byte-identical for the same inputs and config (task sizes and CPUs do not
matter). Everything that can be checked before Ray starts is checked before.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer

from moe_platform.data import storage
from moe_platform.data.config import DataConfig, chat_template, render_prompt
from moe_platform.data.errors import DataError
from moe_platform.data.manifest import (
    DEFAULT_COLUMNS,
    INSTRUCTION_COLUMNS,
    LOSS_MASK_COLUMN,
    MANIFEST_FILE,
    SPLITS,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    DocumentStats,
    Manifest,
    Skip,
    SplitInfo,
    TokenizerInfo,
)
from moe_platform.data.identity import (  # noqa: F401  (compute_fingerprint: part of this module's API)
    IN_PROGRESS_FILE,
    check_dataset_dir,
    clear_outputs,
    compute_fingerprint,
)
from moe_platform.data.packing import TRAIN, VALIDATION, RowPacker, ShardWriter, assign_split
from moe_platform.data.instructions import builtin_corpus
from moe_platform.data.records import Document, RecordFormat, read_records
from moe_platform.data.sources import Corpus, SourceFile, find_corpus, resolved_max_bytes
from moe_platform.data.tokenizer import (
    encode_documents,
    encode_instructions,
    encoder_from_json,
    declared_special_tokens,
    load_tokenizer,
    sha256_text,
    special_token_ids,
    tokenizer_json,
    train_tokenizer,
)

log = logging.getLogger(__name__)

# Split codes in the tokenized stream; a skip carries SKIPPED and no tokens.
SPLIT_CODES = {TRAIN: 0, VALIDATION: 1}
SKIPPED = -1


@dataclass
class TokenizerBundle:
    tokenizer: Tokenizer
    serialized: str
    eos_id: int
    pad_id: int
    trained: bool
    # The token strings, for the dataset's tokenizer_config.json (what exports copy).
    eos_token: str = "<|endoftext|>"
    pad_token: Optional[str] = "<|pad|>"
    bos_token: Optional[str] = None


@dataclass
class PreparePlan:
    """Everything decided on the driver before Ray starts."""

    config: DataConfig
    corpus: Corpus
    fingerprint: str
    # A complete dataset with this fingerprint already in dataset_dir: reuse it.
    existing: Optional[Manifest] = None


@dataclass
class PrepareResult:
    manifest: Manifest
    reused: bool

    def summary(self) -> str:
        return format_summary(self.manifest, reused=self.reused)


# ---- the pipeline, top to bottom ---------------------------------------------------------------


def prepare_dataset(config: DataConfig, *, start_ray: Optional[Callable[[], None]] = None) -> PrepareResult:
    """Prepare (or reuse) the dataset that `config` describes. Raises DataError for unusable input.

    `start_ray` connects to Ray (jobs pass `jobs.common.init_ray`); it is called only once the
    driver-side checks passed and there is work for the cluster.
    """
    plan = plan_dataset(config.resolved())
    if plan.existing is not None:
        log.info("%s already holds this dataset (fingerprint %s): reusing it", plan.config.dataset_dir, plan.fingerprint[:12])
        return PrepareResult(plan.existing, reused=True)
    bundle = build_tokenizer(plan)
    (start_ray or _start_local_ray)()
    return PrepareResult(write_dataset(plan, bundle), reused=False)


def find_input(config: DataConfig) -> Corpus:
    """The corpus to prepare: data.input's files, or with none given the built-in corpus of data.kind
    (the standard library's sources for text, an instruction set generated from them for instructions)."""
    if config.kind == "instruction" and not config.input:
        return builtin_corpus(config, resolved_max_bytes(config))
    return find_corpus(config)


def plan_dataset(config: DataConfig) -> PreparePlan:
    try:
        corpus = find_input(config)
    except (OSError, pa.ArrowException) as exc:
        # Listing a bucket can fail (credentials, network): one line naming data.input, no traceback.
        raise DataError(f"data.input: cannot list {config.input}: {str(exc).strip().splitlines()[0]}") from None
    log.info("corpus: %d file(s) from %s", len(corpus.files), corpus.input)
    fingerprint = compute_fingerprint(config, corpus)
    existing = check_dataset_dir(config.dataset_dir, fingerprint, overwrite=config.overwrite, config=config)
    return PreparePlan(config=config, corpus=corpus, fingerprint=fingerprint, existing=existing)


def build_tokenizer(plan: PreparePlan) -> TokenizerBundle:
    config = plan.config
    eos, pad, bos = config.eos_token, config.pad_token, None
    if config.tokenizer:
        tokenizer, trained = load_tokenizer(config.tokenizer), False
        eos, pad, bos = declared_special_tokens(config.tokenizer) or (eos, pad, bos)
        log.info("reusing tokenizer %s (vocab %d)", config.tokenizer, tokenizer.get_vocab_size())
    else:
        texts, skipped = tokenizer_sample(plan.corpus, config)
        if not texts:
            raise DataError(f"no usable documents in {plan.corpus.input}: {summarize_skips(skipped)}")
        log.info("training a byte-level BPE (vocab %d) on %d documents", config.vocab_size, len(texts))
        tokenizer = train_tokenizer(
            texts, vocab_size=config.vocab_size, special_tokens=config.special_tokens, min_frequency=config.min_frequency
        )
        trained = True
    eos_id, pad_id = special_token_ids(tokenizer, eos_token=eos, pad_token=pad)
    return TokenizerBundle(tokenizer, tokenizer_json(tokenizer), eos_id, pad_id, trained, eos, pad, bos)


def tokenizer_config(config: DataConfig, bundle: TokenizerBundle) -> dict:
    """tokenizer_config.json beside the dataset's tokenizer.json: its special tokens and, for an
    instruction set, data.prompt_template as a chat template. Exports of models trained on the
    dataset copy it, so transformers' AutoTokenizer (and our server) know eos and the template."""
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": bundle.eos_token}
    tc.update({name: token for name, token in (("pad_token", bundle.pad_token), ("bos_token", bundle.bos_token))
               if token is not None})
    if config.kind == "instruction":
        tc["chat_template"] = chat_template(config.prompt_template)
    return tc


def write_dataset(plan: PreparePlan, bundle: TokenizerBundle) -> Manifest:
    """Write tokenizer, shards and (last) the manifest; on any failure leave no half dataset."""
    dataset_dir = plan.config.dataset_dir
    clear_outputs(dataset_dir)
    for split in SPLITS:
        storage.make_dirs(storage.join(dataset_dir, split))
    marker = json.dumps({"fingerprint": plan.fingerprint}).encode()
    storage.write_bytes_atomically(storage.join(dataset_dir, IN_PROGRESS_FILE), marker)
    try:
        storage.write_bytes_atomically(storage.join(dataset_dir, TOKENIZER_FILE), bundle.serialized.encode("utf-8"))
        storage.write_bytes_atomically(storage.join(dataset_dir, TOKENIZER_CONFIG_FILE),
                                       json.dumps(tokenizer_config(plan.config, bundle), indent=2).encode("utf-8"))
        collector = ShardCollector(plan.config, plan.corpus)
        for table in tokenize_on_ray(plan, bundle):
            if not collector.consume(table):
                break  # the document cap is reached; closing the iterator stops Ray Data
        manifest = collector.finish(plan, bundle)
        manifest.save(dataset_dir)
    except BaseException:
        clear_outputs(dataset_dir)
        raise
    storage.delete(storage.join(dataset_dir, IN_PROGRESS_FILE))
    return manifest


# ---- driver-side decisions (the dataset directory's identity: identity.py) ------------------------


def tokenizer_sample(corpus: Corpus, config: DataConfig) -> tuple[list[str], list[Skip]]:
    """Train-split texts for BPE training, up to data.tokenizer_train_bytes.

    Files are visited in hash order: a spread over the whole corpus, not its alphabetical start.
    Validation documents stay out, so validation text is unseen by the tokenizer too.
    """
    texts, skipped, budget = [], [], config.tokenizer_train_bytes
    record_format = RecordFormat.of(config)
    for file in sorted(corpus.files, key=lambda f: hashlib.sha256(f.identity.encode()).digest()):
        for item in read_records(file, record_format):
            if isinstance(item, Skip):
                skipped.append(item)
            elif assign_split(item.identity, config.validation_fraction, config.split_seed) == TRAIN:
                text = item.text if isinstance(item, Document) else (
                    render_prompt(config.prompt_template, item.prompt) + item.response)
                texts.append(text)
                budget -= len(text)
        if budget <= 0:
            break
    return texts, skipped


# ---- Ray Data --------------------------------------------------------------------------------


def tokenize_on_ray(plan: PreparePlan, bundle: TokenizerBundle) -> Iterator[pa.Table]:
    """Tables of tokenized documents and skips, in corpus order, computed by Ray Data tasks."""
    import ray

    config, files = plan.config, plan.corpus.files
    with _ordered_execution():
        dataset = ray.data.from_items(
            [asdict(f) for f in files], override_num_blocks=math.ceil(len(files) / config.files_per_task)
        )
        dataset = dataset.map_batches(
            tokenize_files,
            batch_format="pyarrow",
            batch_size=config.files_per_task,
            num_cpus=config.num_cpus_per_task,
            fn_kwargs={
                "tokenizer_serialized": bundle.serialized,
                "eos_id": bundle.eos_id,
                "record_format": RecordFormat.of(config),
                "prompt_template": config.prompt_template,
                "validation_fraction": config.validation_fraction,
                "split_seed": config.split_seed,
            },
        )
        yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow")


def tokenize_files(
    files: pa.Table,
    *,
    tokenizer_serialized: str,
    eos_id: int,
    record_format: RecordFormat,
    prompt_template: str,
    validation_fraction: float,
    split_seed: int,
) -> pa.Table:
    """Ray Data task: a batch of files -> one row per document or skip, in order.

    Columns: split (int8: 0 train, 1 validation, -1 skipped), tokens (list<int32>, ending in
    eos; empty for a skip), path (the file, for every row) and reason (set for a skip); for
    instruction data also loss_mask (list<int8>, 1 on response tokens and eos). Never raises
    for bad input.
    """
    codes, paths, reasons, records = [], [], [], []
    for record in files.to_pylist():
        file = SourceFile(**record)
        for item in read_records(file, record_format):
            if isinstance(item, Skip):
                codes.append(SKIPPED)
                paths.append(item.path)
                reasons.append(item.reason)
            else:
                codes.append(SPLIT_CODES[assign_split(item.identity, validation_fraction, split_seed)])
                paths.append(file.location)
                reasons.append("")
                records.append(item)
    tokenizer = encoder_from_json(tokenizer_serialized)
    columns = {"split": pa.array(codes, type=pa.int8())}
    if record_format.kind == "instruction":
        prompts = [render_prompt(prompt_template, r.prompt) for r in records]
        encoded = encode_instructions(tokenizer, prompts, [r.response for r in records], eos_id)
        columns["tokens"] = _ragged(codes, [tokens for tokens, _ in encoded], np.int32)
        columns[LOSS_MASK_COLUMN] = _ragged(codes, [mask for _, mask in encoded], np.int8)
    else:
        columns["tokens"] = _ragged(codes, encode_documents(tokenizer, [r.text for r in records], eos_id), np.int32)
    columns["path"] = pa.array(paths, type=pa.string())
    columns["reason"] = pa.array(reasons, type=pa.string())
    return pa.table(columns)


def _ragged(codes: list[int], arrays: Sequence[np.ndarray], dtype: type) -> pa.LargeListArray:
    """One list per row of `codes`: the next array for a document, an empty list for a skip."""
    encoded = iter(arrays)
    empty = np.empty(0, dtype=dtype)
    per_row = [next(encoded) if code != SKIPPED else empty for code in codes]
    lengths = np.array([len(values) for values in per_row], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.concatenate(per_row) if per_row else empty
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.from_numpy_dtype(dtype)))


@contextlib.contextmanager
def _ordered_execution():
    """Ray Data in input order (determinism) and quiet (the job prints its own summary)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars, context.print_on_execution_start)
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    try:
        yield
    finally:
        (context.execution_options.preserve_order, context.enable_progress_bars,
         context.print_on_execution_start) = saved


def _start_local_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init()


# ---- the driver's side of the stream ---------------------------------------------------------


class ShardCollector:
    """Counts documents and skips, packs each split's tokens (and loss mask) into rows, writes the shards.

    Instruction rows whose targets are all masked out (a prompt longer than a row) are kept:
    dropping them would break "rows = the token stream less the tail", and the loss already
    ignores them. The manifest counts them (rows_without_loss) next to loss_tokens.
    """

    def __init__(self, config: DataConfig, corpus: Corpus):
        self.config = config
        self.read = len(corpus.skipped)  # files passed over while listing count as read and skipped
        self.used = 0
        self.skipped: list[Skip] = list(corpus.skipped)
        self.loss_mask = config.kind == "instruction"
        self.packers = {split: RowPacker(config.row_len) for split in SPLITS}
        self.mask_packers = {split: RowPacker(config.row_len, np.int8) for split in SPLITS}
        self.writers = {
            split: ShardWriter(config.dataset_dir, split, row_len=config.row_len, shard_rows=config.shard_rows,
                               row_group_rows=config.row_group_rows, loss_mask=self.loss_mask)
            for split in SPLITS
        }
        self.loss_tokens = {split: 0 for split in SPLITS}
        self.rows_without_loss = {split: 0 for split in SPLITS}
        self._documents_left = config.max_documents or math.inf
        # Instruction data: files with a usable record, and the last file seen (maybe cut by the cap).
        self._files_used: set[str] = set()
        self._last_path: Optional[str] = None

    def consume(self, table: pa.Table) -> bool:
        """Take one block of the stream; False once the document cap is reached."""
        if len(table) > self._documents_left:
            table = table.slice(0, int(self._documents_left))
        self._documents_left -= len(table)
        self.read += len(table)
        codes = table.column("split").to_numpy()
        tokens = table.column("tokens").combine_chunks()
        self._record_skips(table, codes)
        self.used += int(np.count_nonzero(codes != SKIPPED))
        lengths = tokens.value_lengths().to_numpy(zero_copy_only=False)
        values = tokens.flatten().to_numpy()
        masks = table.column(LOSS_MASK_COLUMN).combine_chunks().flatten().to_numpy() if self.loss_mask else None
        for split, code in SPLIT_CODES.items():
            # Tokens of this split's documents, in document order.
            chosen = np.repeat(codes == code, lengths)
            rows_RL = self.packers[split].add(values[chosen])
            if masks is None:
                self.writers[split].add(rows_RL)
            else:
                self.writers[split].add(rows_RL, self._pack_mask(split, masks[chosen]))
        if self.loss_mask and len(table):
            self._files_used.update(pc.unique(table.column("path").filter(pa.array(codes != SKIPPED))).to_pylist())
            self._last_path = table.column("path")[-1].as_py()
        return self._documents_left > 0

    def _pack_mask(self, split: str, mask_N: np.ndarray) -> np.ndarray:
        """Pack the mask like the tokens (same lengths in, same rows out) and count its targets."""
        mask_RL = self.mask_packers[split].add(mask_N)
        # A model predicts tokens[1:] of a row: position 0 is never a target, whatever its mask.
        targets_R = mask_RL[:, 1:].sum(axis=1, dtype=np.int64)
        self.loss_tokens[split] += int(targets_R.sum())
        self.rows_without_loss[split] += int(np.count_nonzero(targets_R == 0))
        return mask_RL

    def _record_skips(self, table: pa.Table, codes: np.ndarray) -> None:
        where = np.flatnonzero(codes == SKIPPED)
        if len(where):
            paths = table.column("path").take(where).to_pylist()
            reasons = table.column("reason").take(where).to_pylist()
            self.skipped.extend(Skip(p, r) for p, r in zip(paths, reasons))

    def finish(self, plan: PreparePlan, bundle: TokenizerBundle) -> Manifest:
        if self.loss_mask:
            self._check_every_file_used(plan.corpus)
        if self.used == 0:
            raise DataError(f"no usable documents in {plan.corpus.input}: {summarize_skips(self.skipped)}")
        splits = {}
        for split in SPLITS:
            shards = self.writers[split].finish()
            rows = sum(s.rows for s in shards)
            splits[split] = SplitInfo(rows=rows, tokens=rows * self.config.row_len, shards=shards)
            if self.loss_mask:
                splits[split].loss_tokens = self.loss_tokens[split]
                splits[split].rows_without_loss = self.rows_without_loss[split]
        tails = {split: packer.tail for split, packer in self.packers.items()}
        if splits[TRAIN].rows == 0:
            raise DataError(
                f"too little text for one row: the train split has {tails[TRAIN]} tokens and a row needs "
                f"data.seq_len + 1 = {self.config.row_len}; lower data.seq_len or add documents"
            )
        if splits[VALIDATION].rows == 0 and self.config.validation_fraction > 0:
            log.warning("the validation split has no full row (%d tokens); raise data.validation_fraction "
                        "or add documents", tails[VALIDATION])
        return self._manifest(plan, bundle, splits, tails)

    def _check_every_file_used(self, corpus: Corpus) -> None:
        """An instruction file none of whose records is usable fails the job, naming the file.

        Instruction files are few and deliberate; one that yields nothing has the wrong field
        names or format, and silently training without it would be a worse surprise than a stop.
        """
        capped = self._documents_left <= 0
        stream_skips = self.skipped[len(corpus.skipped):]  # listing skips (unsupported types) are not read
        unusable = list(dict.fromkeys(
            s.path for s in stream_skips
            if s.path not in self._files_used and not (capped and s.path == self._last_path)))
        if not unusable:
            return
        first = unusable[0]
        reasons = summarize_skips([s for s in stream_skips if s.path == first])
        more = f" (and {len(unusable) - 1} more file(s) like it)" if len(unusable) > 1 else ""
        raise DataError(
            f"{first} has no usable instruction record ({reasons}){more}: each record needs the string fields "
            f"{self.config.prompt_field!r} (data.prompt_field) and {self.config.response_field!r} (data.response_field)"
        )

    def _manifest(self, plan: PreparePlan, bundle: TokenizerBundle, splits: dict, tails: dict) -> Manifest:
        config, corpus = self.config, plan.corpus
        return Manifest(
            seq_len=config.seq_len,
            vocab_size=bundle.tokenizer.get_vocab_size(),
            tokenizer=TokenizerInfo(file=TOKENIZER_FILE, sha256=sha256_text(bundle.serialized),
                                    eos_id=bundle.eos_id, pad_id=bundle.pad_id),
            splits=splits,
            documents=DocumentStats(read=self.read, used=self.used, skipped=self.skipped, tail_tokens_dropped=tails),
            columns=dict(INSTRUCTION_COLUMNS if self.loss_mask else DEFAULT_COLUMNS),
            input={
                "location": corpus.input,
                "default_corpus": corpus.is_default,
                "files": len(corpus.files),
                "bytes": sum(f.size for f in corpus.files),
                "max_bytes": resolved_max_bytes(config),
                "max_documents": config.max_documents,
                "tokenizer_trained": bundle.trained,
                # The built-in instruction set: generator, record count, content sha256.
                **({"generated": corpus.generated} if corpus.generated else {}),
            },
            fingerprint=plan.fingerprint,
            config=config.to_dict(),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            dataset_dir=config.dataset_dir,
        )


# ---- what the user reads -----------------------------------------------------------------------


def summarize_skips(skipped: list[Skip]) -> str:
    """'3 skipped: 2 invalid UTF-8, 1 malformed JSON' - reasons grouped without their positions."""
    if not skipped:
        return "0 skipped"
    counts = Counter(_reason_kind(s.reason) for s in skipped)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))  # most common first, then by name
    return f"{len(skipped)} skipped: " + ", ".join(f"{n} {kind}" for kind, n in ranked)


def _reason_kind(reason: str) -> str:
    kind = re.sub(r"^(line|row) \d+: ", "", reason)
    kind = re.sub(r" at byte \d+$", "", kind)
    kind = re.sub(r"^read error: .*", "read error", kind)  # the library's own sentence stays in the manifest
    return re.sub(r" \(.*\)$", "", kind)


def format_summary(manifest: Manifest, *, reused: bool) -> str:
    docs = manifest.documents
    lines = [
        f"{'Reused' if reused else 'Prepared'} dataset {manifest.dataset_dir}",
        f"  manifest:   {storage.join(manifest.dataset_dir, MANIFEST_FILE)}",
        f"  tokenizer:  {manifest.tokenizer_path} (vocab {manifest.vocab_size}, eos {manifest.tokenizer.eos_id}, "
        f"pad {manifest.tokenizer.pad_id})",
        f"  documents:  {docs.read} read, {docs.used} used, {summarize_skips(docs.skipped)}"
        + (" (paths and reasons in manifest.json)" if docs.skipped else ""),
    ]
    for name, split in manifest.splits.items():
        lines.append(
            f"  {name + ':':<11} {split.rows} rows x {manifest.row_len} tokens = {split.tokens} tokens "
            f"in {len(split.shards)} shard(s) under {storage.join(manifest.dataset_dir, name)}/ "
            f"(tail of {docs.tail_tokens_dropped.get(name, 0)} tokens dropped)"
            + (f"; {split.loss_tokens} loss tokens, {split.rows_without_loss} rows without any"
               if split.loss_tokens is not None else "")
        )
    return "\n".join(lines)
