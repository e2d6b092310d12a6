"""Step-level generation: a fixed pool of sequence slots, each with its own rows of one KV cache.

    decoder = SlotDecoder(model, num_slots=8)
    slot, token = decoder.prefill(prompt_ids, Sampling(temperature=0.7, seed=1))  # first new token
    tokens = decoder.decode([slot, ...])  # one step over the given running slots: next token each
    decoder.release(slot)                 # the slot is free for the next prompt at once

This is what continuous (iteration-level) batching needs: a prompt joins the running batch at the
next step and a finished sequence leaves it at once, because slots are independent. Every row
carries its own sampling parameters and RNG, and with token-choice routing (dropless, per token,
at inference) a row's logits do not depend on its neighbours, so a greedy or seeded sequence
gives the same tokens alone or in any batch. `MoETransformer.generate()` runs on this too.

Why slots and not paged blocks: a slot holds a whole context (model.seq_len positions), so
a decode step attends over contiguous rows with the stock `scaled_dot_product_attention` and
no block table. Paging pays off when memory is the limit and lengths vary a lot (many slots,
long contexts, on a GPU with a paged-attention kernel); in pure PyTorch a paged cache would be
gathered into contiguous rows every step anyway, and the pool's size (slots x context) is one
config value the operator sets.

Expert-choice routing is not causal (each step routes among the tokens present), so a row
would depend on its batch: the serving scheduler runs one sequence at a time for such models,
and generate() warns.

Shapes: S slots, A running rows in a decode step, T prompt tokens, H heads, L cache length,
Hd head dim, V vocab.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sampling:
    """Per-row sampling: temperature 0 = greedy; top_k 0 and top_p 1 = no cut; seed None = random."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature} must be a finite number >= 0 (0 = greedy).")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off).")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1].")


def new_generator(sampling: Sampling, device) -> Optional[torch.Generator]:
    """A row's own RNG: seeded rows reproduce, unseeded ones draw a fresh seed; greedy needs none."""
    if sampling.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(sampling.seed if sampling.seed is not None else random.getrandbits(63))
    return generator


class _PrefillRows:
    """One prompt into one slot: write its keys/values at [0, T) and attend over them (causal)."""

    def __init__(self, k_SHLd: Tensor, v_SHLd: Tensor, slot: int) -> None:
        self.k, self.v, self.slot = k_SHLd, v_SHLd, slot

    def update(self, k_1HTd: Tensor, v_1HTd: Tensor) -> tuple[Tensor, Tensor]:
        T = k_1HTd.shape[2]
        self.k[self.slot:self.slot + 1, :, :T] = k_1HTd
        self.v[self.slot:self.slot + 1, :, :T] = v_1HTd
        return k_1HTd, v_1HTd


class _DecodeRows:
    """One new token per running slot, written at that slot's own position; attend over [0, width)."""

    def __init__(self, k_SHLd: Tensor, v_SHLd: Tensor, rows_A: Tensor, pos_A: Tensor, width: int,
                 row_range: Optional[slice]) -> None:
        self.k, self.v, self.rows, self.pos, self.width = k_SHLd, v_SHLd, rows_A, pos_A, width
        # Consecutive slots in order are read as a view; any other set is gathered (a copy).
        self.read_rows = row_range if row_range is not None else rows_A

    def update(self, k_AH1d: Tensor, v_AH1d: Tensor) -> tuple[Tensor, Tensor]:
        self.k[self.rows, :, self.pos] = k_AH1d[:, :, 0]  # (A, H, Hd) at (slot, :, position)
        self.v[self.rows, :, self.pos] = v_AH1d[:, :, 0]
        return self.k[self.read_rows, :, :self.width], self.v[self.read_rows, :, :self.width]  # (A, H, width, Hd)


class SlotDecoder:
    """A fixed pool of `num_slots` sequences over one model, with a KV cache preallocated once.

    Not thread-safe: one caller drives it (the serving scheduler between its steps, or a loop).
    """

    def __init__(self, model, num_slots: int, *, cache_length: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> None:
        """cache_length: positions per slot (default model.seq_len). generator: one RNG shared by
        every sampled row (generate()'s argument); None gives each row its own (new_generator)."""
        from .model import KVCache

        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots} must be at least 1.")
        self.model = model
        self.length = cache_length or model.config.seq_len
        weight = model.tok_emb.weight
        self.device = weight.device
        self.cache = KVCache(model.config, num_slots, self.length, weight.dtype, weight.device)
        self._shared_generator = generator
        # A heap: the lowest free slot goes first, so busy slots stay packed at the front and a
        # full pool decodes consecutive rows, read as a view rather than gathered.
        self._free = list(range(num_slots))
        self._filled = [0] * num_slots  # positions of the slot's cache in use
        self._next = [0] * num_slots  # the last sampled token, the next decode step's input
        self._sampling: list[Optional[Sampling]] = [None] * num_slots
        self._generator: list[Optional[torch.Generator]] = [None] * num_slots

    @property
    def num_slots(self) -> int:
        return len(self._filled)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def room(self, slot: int) -> int:
        """New tokens the slot can still take: its first token from prefill needs no room."""
        return self.length - self._filled[slot]

    @torch.no_grad()
    def prefill(self, prompt_ids: Sequence[int], sampling: Sampling = Sampling()) -> tuple[int, int]:
        """Take a free slot, run the prompt through it, sample its first new token: (slot, token)."""
        if not self._free:
            raise RuntimeError("no free slot: release a finished sequence first")
        T = len(prompt_ids)
        if not 1 <= T <= self.length:
            raise ValueError(f"a prompt of {T} tokens does not fit a slot of {self.length} positions.")
        sampling.validate()
        slot = heapq.heappop(self._free)
        try:
            idx_1T = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
            positions_1T = torch.arange(T, device=self.device)[None]
            layers = [_PrefillRows(k, v, slot) for k, v in zip(self.cache.k, self.cache.v)]
            logits_1V = self.model.forward_cached(idx_1T, positions_1T, layers, mask=None)
        except BaseException:
            heapq.heappush(self._free, slot)
            raise
        self._filled[slot] = T
        self._sampling[slot] = sampling
        shared = self._shared_generator
        self._generator[slot] = shared if shared is not None else new_generator(sampling, self.device)
        token = int(sample_rows(logits_1V, [sampling], [self._generator[slot]])[0])
        self._next[slot] = token
        return slot, token

    @torch.no_grad()
    def decode(self, slots: Sequence[int]) -> list[int]:
        """One decoding step for the given running slots (any subset, any order; ascending
        consecutive slots are cheapest): the next token each."""
        if not slots:
            return []
        full = [s for s in slots if self._filled[s] >= self.length]
        if full:
            raise ValueError(f"slot {full[0]} is full ({self.length} positions): release it.")
        rows_A = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        pos_A = torch.tensor([self._filled[s] for s in slots], dtype=torch.long, device=self.device)
        width = int(pos_A.max()) + 1
        mask_A11W = (torch.arange(width, device=self.device)[None] <= pos_A[:, None])[:, None, None]
        idx_A1 = torch.tensor([[self._next[s]] for s in slots], dtype=torch.long, device=self.device)
        consecutive = list(slots) == list(range(slots[0], slots[0] + len(slots)))
        row_range = slice(slots[0], slots[0] + len(slots)) if consecutive else None
        layers = [_DecodeRows(k, v, rows_A, pos_A, width, row_range) for k, v in zip(self.cache.k, self.cache.v)]
        logits_AV = self.model.forward_cached(idx_A1, pos_A[:, None], layers, mask=mask_A11W)
        tokens = sample_rows(logits_AV, [self._sampling[s] for s in slots], [self._generator[s] for s in slots])
        out = tokens.tolist()
        for s, token in zip(slots, out):
            self._filled[s] += 1
            self._next[s] = token
        return out

    def release(self, slot: int) -> None:
        """Free the slot (its cache rows are simply overwritten by the next prefill)."""
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not in use.")
        self._sampling[slot] = self._generator[slot] = None
        self._filled[slot] = 0
        heapq.heappush(self._free, slot)


def sample_rows(logits_AV: Tensor, samplings: Sequence[Sampling],
                generators: Sequence[Optional[torch.Generator]]) -> Tensor:
    """Next token per row, each row with its own parameters and RNG; rows never mix."""
    tokens_A = logits_AV.argmax(-1)
    sampled = [a for a, s in enumerate(samplings) if not s.greedy]
    if not sampled:
        return tokens_A
    probs_RV = filtered_probs(logits_AV[sampled].float(), [samplings[a] for a in sampled])
    for r, a in enumerate(sampled):
        tokens_A[a] = torch.multinomial(probs_RV[r], 1, generator=generators[a])[0]
    return tokens_A


def filtered_probs(logits_RV: Tensor, samplings: Sequence[Sampling]) -> Tensor:
    """softmax(logits / temperature) after the top-k then top-p cuts, per row.

    Numerically safe for any temperature > 0: the row maximum is subtracted before dividing,
    so the best token's scaled logit is exactly 0 and the others are <= 0 (a tiny temperature
    sends them to -inf, which softmax maps to 0); nothing overflows to inf or NaN.
    """
    V = logits_RV.shape[-1]
    # A temperature below float32's smallest normal number would round to 0 (0 / 0 = NaN).
    temperature_R1 = logits_RV.new_tensor([s.temperature for s in samplings])[:, None].clamp(
        min=torch.finfo(torch.float32).tiny)
    top_k_R1 = torch.tensor([min(s.top_k or V, V) for s in samplings], device=logits_RV.device)[:, None]
    top_p_R1 = logits_RV.new_tensor([s.top_p for s in samplings])[:, None]
    scaled_RV = (logits_RV - logits_RV.max(-1, keepdim=True).values) / temperature_R1
    sorted_RV, order_RV = scaled_RV.sort(dim=-1, descending=True, stable=True)
    keep_RV = torch.arange(V, device=logits_RV.device)[None] < top_k_R1
    probs_RV = sorted_RV.masked_fill(~keep_RV, -math.inf).softmax(-1)
    # Drop a token when the tokens ranked above it already hold top_p of the mass (never the first).
    keep_RV &= probs_RV.cumsum(-1) - probs_RV <= top_p_R1
    kept_RV = sorted_RV.masked_fill(~keep_RV, -math.inf)
    return torch.empty_like(kept_RV).scatter_(-1, order_RV, kept_RV).softmax(-1)
