"""Instruction data (data.kind=instruction): reading records, the loss mask, the built-in set.

Three prepare runs on the session's local Ray, each a few KB: a user directory with custom
field names and a reused tokenizer (shared by several tests), the built-in set, and a file
whose every record is unusable.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from testkit.datasets import write_parquet
from tokenizers import Tokenizer

from moe_platform.data import DataConfig, DataError, Manifest
from moe_platform.data.instructions import BUILTIN_IDENTITY, write_stdlib_instructions
from moe_platform.data.manifest import Skip
from moe_platform.data.prepare import compute_fingerprint, find_input, prepare_dataset
from moe_platform.data.records import Instruction, RecordFormat, read_records
from moe_platform.data.sources import SourceFile, find_corpus
from moe_platform.data.tokenizer import encode_instructions, train_tokenizer

TEMPLATE = "Q: {prompt}\nA: "
# ASCII only: a row boundary never cuts a multi-byte character, so masked slices decode exactly.
RECORDS = [
    ("What is an expert?", "A feed-forward block that only some tokens visit."),
    ("Name the router's job.", "It picks the top-k experts for every token."),
    ("Why balance the load?", "So no expert idles while another overflows."),
]
PARQUET_RECORDS = [("Is {this} literal?", "Yes: braces in prompts are text.")]
BAD_LINES = ['{"question": "no answer here"}', "{not json", '{"question": "q", "answer": 7}',
             '{"question": "q", "answer": "   "}']


def instruction_config(input_path, dataset_dir, **overrides) -> DataConfig:
    settings = dict(input=str(input_path) if input_path else None, dataset_dir=str(dataset_dir), kind="instruction",
                    vocab_size=300, seq_len=16, validation_fraction=0.0, shard_rows=4, files_per_task=2)
    settings.update(overrides)
    return DataConfig(**settings)


def reused_tokenizer(path: Path) -> Tokenizer:
    """A tokenizer as a pretrained export ships it, with eos at id 1 (not 0) to prove it is looked up."""
    texts = [p + r for p, r in RECORDS] * 5
    tokenizer = train_tokenizer(texts, vocab_size=300, special_tokens=["<|pad|>", "<|endoftext|>"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tokenizer.to_str(), encoding="utf-8")
    return tokenizer


def read_split(manifest: Manifest, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Flattened tokens and loss_mask of a split, checking the two columns' contract on the way."""
    tables = [pq.read_table(path) for path in manifest.split_paths(split)]
    for table in tables:
        assert table.schema.names == ["tokens", "loss_mask"]
        assert table.schema.field("loss_mask").type == pa.list_(pa.int8())
    tokens = np.array([row for t in tables for row in t.column("tokens").to_pylist()], dtype=np.int32)
    masks = np.array([row for t in tables for row in t.column("loss_mask").to_pylist()], dtype=np.int8)
    assert tokens.shape == masks.shape and tokens.shape[1] == manifest.row_len
    return tokens, masks


@pytest.fixture(scope="module")
def custom_run(ray_cluster, tmp_path_factory):
    """A directory with a .jsonl (good and bad lines), a .parquet and a .txt; custom field names."""
    root = tmp_path_factory.mktemp("instructions")
    corpus = root / "corpus"
    corpus.mkdir()
    good = [json.dumps({"question": q, "answer": a, "id": i}) for i, (q, a) in enumerate(RECORDS)]
    lines = good[:1] + BAD_LINES + good[1:]
    (corpus / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"answer": [a for _, a in PARQUET_RECORDS], "question": [q for q, _ in PARQUET_RECORDS]}),
                   corpus / "b.parquet")
    (corpus / "notes.txt").write_text("not an instruction")
    tokenizer = reused_tokenizer(root / "export" / "tokenizer.json")
    config = instruction_config(corpus, root / "ds", prompt_field="question", response_field="answer",
                                prompt_template=TEMPLATE, tokenizer=str(root / "export" / "tokenizer.json"))
    result = prepare_dataset(config)
    return result, tokenizer, corpus


def test_loss_mask_covers_exactly_the_response_tokens_and_eos(custom_run):
    result, tokenizer, _ = custom_run
    manifest = result.manifest
    tokens_RL, masks_RL = read_split(manifest, "train")
    records = RECORDS + PARQUET_RECORDS
    # The expected stream: rendered prompt (mask 0), response + eos (mask 1), record after record.
    want_tokens, want_mask = [], []
    for prompt, response in records:
        p, r = tokenizer.encode(TEMPLATE.replace("{prompt}", prompt)).ids, tokenizer.encode(response).ids
        want_tokens += p + r + [1]
        want_mask += [0] * len(p) + [1] * (len(r) + 1)
    tail = manifest.documents.tail_tokens_dropped["train"]
    assert tokens_RL.size + tail == len(want_tokens) and tail < manifest.row_len
    assert tokens_RL.reshape(-1).tolist() == want_tokens[: tokens_RL.size]
    assert masks_RL.reshape(-1).tolist() == want_mask[: tokens_RL.size]
    # Decoded, the masked-in tokens are the responses, each ended by the reused tokenizer's eos.
    flat, mask = tokens_RL.reshape(-1), masks_RL.reshape(-1).astype(bool)
    responses = "".join(f"{r}<|endoftext|>" for _, r in records)
    answered = tokenizer.decode(flat[mask].tolist(), skip_special_tokens=False)
    assert responses.startswith(answered) and len(answered) > len(responses) // 2
    prompts = "".join(TEMPLATE.replace("{prompt}", p) for p, _ in records)
    assert prompts.startswith(tokenizer.decode(flat[~mask].tolist()))
    assert mask[flat == 1].all() and np.count_nonzero(flat == 1) >= len(records) - 1  # every eos counts
    assert (manifest.tokenizer.eos_id, manifest.tokenizer.pad_id) == (1, 0)
    assert manifest.input["tokenizer_trained"] is False


def test_manifest_lists_the_column_and_counts_loss_tokens(custom_run):
    result, _, _ = custom_run
    manifest = Manifest.load(result.manifest.dataset_dir)
    assert manifest.columns == {"tokens": "list<int32>", "loss_mask": "list<int8>"}
    _, masks_RL = read_split(manifest, "train")
    train = manifest.splits["train"]
    assert train.loss_tokens == int(masks_RL[:, 1:].sum()) > 0
    assert train.rows_without_loss == int(np.count_nonzero(masks_RL[:, 1:].sum(axis=1) == 0))
    assert manifest.splits["validation"].loss_tokens == 0
    assert manifest.config["kind"] == "instruction"
    assert "loss tokens" in result.summary()


def test_bad_lines_and_other_files_are_named_skips(custom_run):
    result, _, corpus = custom_run
    docs = result.manifest.documents
    jsonl = str(corpus / "a.jsonl")
    assert docs.skipped == [
        Skip(str(corpus / "notes.txt"), "unsupported file type '.txt'"),
        Skip(jsonl, "line 2: no 'answer' field (data.response_field)"),
        Skip(jsonl, "line 3: malformed JSON (Expecting property name enclosed in double quotes)"),
        Skip(jsonl, "line 4: 'answer' is int, not a string"),
        Skip(jsonl, "line 5: empty 'answer'"),
    ]
    assert (docs.read, docs.used) == (len(RECORDS) + len(PARQUET_RECORDS) + 5, len(RECORDS) + len(PARQUET_RECORDS))


def test_a_file_with_no_usable_record_fails_naming_it(custom_run, tmp_path):
    _, _, corpus = custom_run
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "good.jsonl").write_text((corpus / "a.jsonl").read_text())
    (mixed / "wrong.jsonl").write_text('{"prompt": "p", "response": "r"}\n' * 3)
    with pytest.raises(DataError, match=r"wrong\.jsonl has no usable instruction record \(3 skipped: 3 no 'question' "
                                        r"field\): .*'question' \(data.prompt_field\)"):
        prepare_dataset(instruction_config(mixed, tmp_path / "ds", prompt_field="question", response_field="answer",
                                           tokenizer=str(Path(custom_run[0].manifest.tokenizer_path))))
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_no_input_uses_the_built_in_set_and_reruns_reuse_it(ray_cluster, tmp_path):
    config = instruction_config(None, tmp_path / "ds", max_documents=40, seq_len=32, validation_fraction=0.2)
    manifest = prepare_dataset(config).manifest
    assert manifest.input["default_corpus"] is True
    assert manifest.input["generated"]["generator"] == "stdlib_instructions"
    assert manifest.input["generated"]["records"] == 40 == manifest.documents.used
    assert manifest.columns["loss_mask"] == "list<int8>" and manifest.input["tokenizer_trained"] is True
    tokens_RL, masks_RL = read_split(manifest, "train")
    tokenizer = Tokenizer.from_file(manifest.tokenizer_path)
    assert tokenizer.decode(tokens_RL.reshape(-1)[~masks_RL.reshape(-1).astype(bool)].tolist()).startswith("# ")
    assert prepare_dataset(config).reused  # the generated file is fingerprinted by content, not mtime


# ---- no Ray ----------------------------------------------------------------------------------


def test_write_stdlib_instructions(tmp_path):
    count = write_stdlib_instructions(str(tmp_path / "set.jsonl"), max_records=5, prompt_field="q")
    records = [json.loads(line) for line in (tmp_path / "set.jsonl").read_text().splitlines()]
    assert count == len(records) == 5
    assert all(r["q"].startswith("# ") and "\ndef " in r["q"] and r["response"].strip() for r in records)
    again = find_input(DataConfig(kind="instruction", max_documents=5, prompt_field="q"))
    assert again.files[0].identity == BUILTIN_IDENTITY
    assert Path(again.files[0].location).read_text() == (tmp_path / "set.jsonl").read_text()


def test_reading_instruction_records(tmp_path):
    path = tmp_path / "r.parquet"
    write_parquet(path, "prompt", ["p0", None])
    assert list(read_records(SourceFile(str(path), "r.parquet", 0, 0), RecordFormat.instruction())) == [
        Skip(str(path), "no column 'response' (data.response_field; columns: prompt)")]
    pq.write_table(pa.table({"prompt": ["p0", None], "response": ["r0", "r1"]}), path)
    assert list(read_records(SourceFile(str(path), "r.parquet", 0, 0), RecordFormat.instruction())) == [
        Instruction("r.parquet#0", "p0", "r0"), Skip(str(path), "row 1: null 'prompt'")]


def test_encoding_masks_the_prompt_and_counts_the_eos():
    tokenizer = train_tokenizer(["hello world"] * 3, vocab_size=270, special_tokens=["<|endoftext|>", "<|pad|>"])
    [(tokens, mask)] = encode_instructions(tokenizer, ["hello "], ["world"], eos_id=0)
    prompt_len = len(tokenizer.encode("hello ").ids)
    assert tokens.dtype == np.int32 and mask.dtype == np.int8 and len(tokens) == len(mask)
    assert mask.tolist() == [0] * prompt_len + [1] * (len(tokens) - prompt_len) and tokens[-1] == 0


def test_text_fingerprints_ignore_the_instruction_keys(corpus):
    root, _ = corpus
    plain = DataConfig(input=str(root))
    found = find_corpus(plain)
    assert compute_fingerprint(plain, found) == compute_fingerprint(
        DataConfig(input=str(root), prompt_field="q", prompt_template="> {prompt}"), found)
    assert compute_fingerprint(plain, found) != compute_fingerprint(DataConfig(input=str(root), kind="instruction"), found)
