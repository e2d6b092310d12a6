"""A replica's model: load an export, tokenize, and decode step by step.

No Ray here. Two ways to batch, chosen by serve.scheduler:
- "continuous" (default): `Engine.scheduler()` gives a scheduler.py Scheduler, which
  admits requests into slots and decodes one token for every running one per step;
- "static": `Engine.stream_batch(jobs)` decodes one fixed batch until its longest job ends
  (kept as the benchmark's baseline). Both are stepped from a worker thread by app.py,
  so the replica's event loop keeps accepting requests while the model runs.

Static batching and sampling. `moe`'s generate_stream takes one set of sampling
parameters (temperature, top_k, top_p, one RNG) per call. A Serve batch may mix
requests with different parameters, so it is split into groups that share them,
each group one generator, all groups stepped in lock step:
- every greedy request (temperature 0) lands in one group: the common case
  batches fully, and a batched greedy result equals the request served alone;
- a request with a `seed` gets its own group and RNG: its output depends only
  on its prompt, parameters and seed, never on what it was batched with;
- unseeded sampled requests share a group per (temperature, top_p, top_k);
- one generate_stream call checks its longest prompt + largest max_tokens against
  the context, so jobs that do not fit that way together go to separate groups.
Expert-choice routing is not causal: moe routes each decoding step among the
tokens present, so a sequence's output would depend on its batch neighbours.
For such a model every request is decoded in its own group (outputs equal the
request served alone; no batching speed-up) and /v1/models says so. (Continuous
batching gives the same guarantees: see scheduler.py.)
"""
from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from moe.export import DEFAULT_EOS as EOS_TOKEN, DEFAULT_PAD as PAD_TOKEN, ExportError  # noqa: F401 (re-exported)
from moe_platform.serve.chat import ChatTemplate, ChatTemplateError, load_chat_template, refuse_special_tokens
from moe_platform.serve.protocol import Prompt, SamplingParams
from moe_platform.serve.text import Delta, TextStream

if TYPE_CHECKING:
    from moe_platform.serve.scheduler import Scheduler

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class GenerationJob:
    """One prompt of one request, tokenized and validated."""

    prompt_ids: Tuple[int, ...]
    params: SamplingParams


@dataclass
class _Group:
    """Jobs decoded by one generator call: same sampling parameters (and RNG)."""

    slots: List[int]  # positions of its jobs in the Serve batch
    steps: Iterator[Any]
    done: bool = False


class Engine:
    def __init__(self, model: Any, tokenizer: Any, special: Any = None,
                 chat_template: Optional["ChatTemplate"] = None) -> None:
        """special: the export's moe.export.SpecialTokens (eos/pad of its tokenizer_config.json);
        None: the platform's own "<|endoftext|>"/"<|pad|>". chat_template: None answers chat with a 400."""
        self.model = model  # moe.MoETransformer
        self.tokenizer = tokenizer  # tokenizers.Tokenizer
        self.chat_template = chat_template  # None: the export has none (chat requests get a 400)
        # As in training (moe_platform.data.tokenizer): special-token strings in text are text.
        # A prompt cannot end a document or inject control tokens by typing "<|endoftext|>".
        self.tokenizer.encode_special_tokens = True
        eos = special.eos if special is not None else EOS_TOKEN
        self.eos_token_id = _special_id(tokenizer, eos)
        # An imported tokenizer may have no pad token (Mixtral's, Llama's): pad with eos, never decoded.
        pad = special.pad if special is not None else PAD_TOKEN
        self.pad_token_id = _special_id(tokenizer, pad) if pad is not None else self.eos_token_id
        self.context_length = int(_model_field(model, "seq_len"))
        self.vocab_size = int(_model_field(model, "vocab_size"))

    @classmethod
    def load(cls, export_dir: str, device: str = "cpu", quantize: str = "none") -> "Engine":
        """safetensors + config.json + tokenizer.json; nothing is unpickled. quantize="int8":
        dynamic int8 linear layers and experts (CPU)."""
        from moe import load_export

        check_export(export_dir)
        # The native backend serves any export (deepspeed-trained ones too): the same function
        # with no token dropped, and no torch.distributed process group needed in the replica.
        model = load_export(export_dir, backend="native", device=device)
        if quantize == "int8":
            from moe.quantize import quantize_int8

            model = quantize_int8(model)
        return cls.for_model(export_dir, model)

    @classmethod
    def for_model(cls, export_dir: str, model: Any) -> "Engine":
        """An engine over a model already loaded from export_dir (and perhaps transformed, e.g.
        quantized): the export's tokenizer, special tokens and chat template."""
        from moe.export import export_tokenizer, special_tokens
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(export_tokenizer(export_dir)))
        tokens = special_tokens(export_dir)
        try:
            chat_template = load_chat_template(export_dir, tokens)
        except ChatTemplateError as exc:
            raise ExportError(f"serve.export_dir={export_dir!r}: {exc}") from None
        return cls(model.eval(), tokenizer, tokens, chat_template)

    # ---- text <-> ids ---------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> List[int]:
        """Text or token ids -> ids. An empty prompt starts from eos, the document boundary
        the model saw in training, so it generates the start of a new document."""
        if isinstance(prompt, list):
            return list(prompt)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        return ids or [self.eos_token_id]

    def encode_messages(self, messages: List[Dict[str, str]]) -> List[int]:
        """A conversation -> ids, as /v1/chat/completions encodes it: the export's chat template (the
        caller checks there is one), the generation prompt after the last turn. A message that types
        a special token is refused (APIError 400)."""
        refuse_special_tokens(messages, list(self.special_tokens))
        return self.encode_chat(self.chat_template.render(messages))

    def encode_chat(self, rendered: str) -> List[int]:
        """A rendered chat template -> ids: its special-token strings become those tokens (the
        template's turn markers), everything else is text. chat.refuse_special_tokens keeps
        clients from typing them inside messages."""
        specials = self.special_tokens
        if not specials:
            return self.encode(rendered)
        pattern = "(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")"
        ids: List[int] = []
        for part in re.split(pattern, rendered):
            if part in specials:
                ids.append(specials[part])
            elif part:
                ids.extend(self.tokenizer.encode(part, add_special_tokens=False).ids)
        return ids or [self.eos_token_id]

    @property
    def special_tokens(self) -> Dict[str, int]:
        """Special-token strings of the tokenizer -> their ids."""
        return {t.content: i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def metadata(self) -> Dict[str, Any]:
        """What /v1/models says about the model beyond its name."""
        routing = _routing(self.model)
        info: Dict[str, Any] = {"context_length": self.context_length, "vocab_size": self.vocab_size}
        if routing:
            info["routing"] = routing
        if not self.is_causal:
            info["warning"] = (
                "expert_choice routing is not causal: each decoding step routes among the tokens present, "
                "so this server decodes every request in its own batch (outputs do not depend on other "
                "requests, but requests are not batched together) and outputs differ from a "
                "teacher-forced forward pass"
            )
        return info

    @property
    def is_causal(self) -> bool:
        return _routing(self.model) != "expert_choice"

    def scheduler(self, num_slots: int) -> "Scheduler":
        """A continuous-batching scheduler over this model (scheduler.py; usable without Serve).
        Expert-choice routing is not causal: one running sequence at a time keeps every output
        independent of the other requests."""
        from moe.generation import SlotDecoder
        from moe_platform.serve.scheduler import Scheduler

        return Scheduler(SlotDecoder(self.model, num_slots), self.decode, self.eos_token_id,
                         max_running=num_slots if self.is_causal else 1)  # fmt: skip

    # ---- decoding ---------------------------------------------------------------------------

    def stream_batch(self, jobs: Sequence[GenerationJob]) -> Iterator[List[Optional[Delta]]]:
        """Yield, per decoding step, one entry per job: its new text (a Delta whose
        finish_reason is set on its last step), or None once it has finished."""
        streams = [self._text_stream(job) for job in jobs]
        slot_groups = _group_slots(jobs, self.context_length, self.is_causal)
        groups = [self._start_group(jobs, slots) for slots in slot_groups]
        while any(s.finish_reason is None for s in streams):
            step: List[Optional[Delta]] = [None] * len(jobs)
            for group in groups:
                if not group.done:
                    self._advance(group, streams, step)
            yield step

    def _text_stream(self, job: GenerationJob) -> TextStream:
        return TextStream(
            decode=self.decode, stop=job.params.stop, max_tokens=job.params.max_tokens, eos_token_id=self.eos_token_id
        )

    def _start_group(self, jobs: Sequence[GenerationJob], slots: List[int]) -> _Group:
        params = jobs[slots[0]].params
        rng = torch.Generator(device=_device(self.model))
        rng.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        steps = self.model.generate_stream(
            [list(jobs[i].prompt_ids) for i in slots],
            max_new_tokens=max(jobs[i].params.max_tokens for i in slots),
            temperature=params.temperature,
            top_k=params.top_k or None,
            top_p=params.top_p,
            eos_token_id=self.eos_token_id,
            generator=rng,
        )
        return _Group(slots=slots, steps=iter(steps))

    def _advance(self, group: _Group, streams: List[TextStream], step: List[Optional[Delta]]) -> None:
        """One decoding step of one group; finished sequences ignore their further tokens."""
        output = next(group.steps, None)
        if output is None:  # the generator ran out: every sequence hit eos or the length cap
            for slot in group.slots:
                if streams[slot].finish_reason is None:
                    step[slot] = streams[slot].push(self.eos_token_id)
            group.done = True
            return
        for slot, token in zip(group.slots, _token_list(output, len(group.slots))):
            if streams[slot].finish_reason is None and token is not None:
                step[slot] = streams[slot].push(token)
        if all(streams[slot].finish_reason is not None for slot in group.slots):
            _close(group.steps)  # stop computing for a group nobody reads
            group.done = True


def next_step(steps: Iterator[List[Optional[Delta]]]) -> Optional[List[Optional[Delta]]]:
    """Advance `Engine.stream_batch` by one step (None when done); run it in a worker thread.
    inference_mode is per thread, so it is entered here, around the model's work."""
    with torch.inference_mode():
        return next(steps, None)


def _group_slots(jobs: Sequence[GenerationJob], context_length: int, causal: bool) -> List[List[int]]:
    """Slots decoded together: same sampling key, and fitting the context as one left-padded
    batch (longest prompt + largest max_tokens), which each job alone was checked to fit."""
    by_key: Dict[Tuple[Any, ...], List[List[int]]] = {}
    for slot, job in enumerate(jobs):
        groups = by_key.setdefault(_sampling_key(job.params, slot, causal), [])
        fitting = next((g for g in groups if _fits(jobs, g + [slot], context_length)), None)
        if fitting is None:
            groups.append([slot])
        else:
            fitting.append(slot)
    return [group for groups in by_key.values() for group in groups]


def _fits(jobs: Sequence[GenerationJob], slots: List[int], context_length: int) -> bool:
    longest = max(len(jobs[i].prompt_ids) for i in slots)
    return longest + max(jobs[i].params.max_tokens for i in slots) <= context_length


def _sampling_key(params: SamplingParams, slot: int, causal: bool) -> Tuple[Any, ...]:
    if not causal:
        return ("alone", slot)  # expert-choice routing mixes a batch's sequences: decode each alone
    if params.greedy:
        return ("greedy",)  # top_p/top_k/seed do not change an argmax
    if params.seed is not None:
        return ("seeded", slot)  # its own RNG stream
    return ("sampled", params.temperature, params.top_p, params.top_k)


def _token_list(output: Any, size: int) -> List[Optional[int]]:
    """One generator step -> one token id (None: not running any more) per sequence of the group.
    moe's generate_stream yields {index in the group: token} for the running sequences."""
    if isinstance(output, dict):
        return [output.get(i) for i in range(size)]
    values = output.reshape(-1).tolist() if isinstance(output, torch.Tensor) else list(output)
    if len(values) != size:
        raise RuntimeError(f"generate_stream yielded {len(values)} tokens for {size} sequences")
    return values


def _close(steps: Iterator[Any]) -> None:
    close = getattr(steps, "close", None)
    if close is not None:
        close()


def check_export(export_dir: str) -> None:
    """Fail early, naming the key: a directory with a readable config.json, safetensors weights,
    tokenizer.json and known special tokens (moe.export owns what an export is)."""
    from moe.export import check_export as check, special_tokens

    check(export_dir, "serve.export_dir")
    try:
        if special_tokens(export_dir).eos is None:
            raise ExportError("its tokenizer has no eos token (tokenizer_config.json eos_token)")
    except ValueError as exc:
        raise ExportError(f"serve.export_dir={export_dir} is not an export: {exc}") from None


def _special_id(tokenizer: Any, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ExportError(f"tokenizer.json has no special token {token!r}")
    return token_id


def _model_field(model: Any, name: str) -> Any:
    return getattr(model.config, name)


def _routing(model: Any) -> Optional[str]:
    moe_config = getattr(model.config, "moe", None)
    return getattr(moe_config, "router", None) if moe_config is not None else None


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device
