"""moe.generation: the slot pool behind continuous batching (prefill, decode steps, per-row sampling)."""
from __future__ import annotations

import pytest
import torch

from moe import ModelConfig, MoEConfig, MoETransformer
from moe.generation import Sampling, SlotDecoder, filtered_probs, sample_rows


def model(router: str = "token_choice") -> MoETransformer:
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=16, router=router,
                    capacity_factor=1.0 if router == "expert_choice" else 0.0)
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, seq_len=32, ffn_hidden=48,
                         init_std=0.2, moe=moe)
    return MoETransformer(config).eval()


PROMPTS = [[5, 9, 2, 33, 7, 1, 60], [11], [3, 3, 40, 22], [8, 8]]


def run_alone(m: MoETransformer, prompt: list[int], n: int, sampling: Sampling) -> list[int]:
    decoder = SlotDecoder(m, 1)
    slot, token = decoder.prefill(prompt, sampling)
    return [token] + [decoder.decode([slot])[0] for _ in range(n - 1)]


def test_sequences_join_and_leave_a_running_batch_without_changing_their_tokens() -> None:
    m = model()
    greedy = Sampling(temperature=0)
    alone = [run_alone(m, p, 6, greedy) for p in PROMPTS]
    assert alone == m.generate(PROMPTS, max_new_tokens=6, temperature=0)
    decoder = SlotDecoder(m, 2)  # fewer slots than prompts: the later ones wait for a free slot
    out: dict[int, list[int]] = {}
    running: dict[int, int] = {}  # slot -> prompt index
    waiting = list(range(len(PROMPTS)))
    while waiting or running:
        while waiting and decoder.free_slots:
            b = waiting.pop(0)
            slot, token = decoder.prefill(PROMPTS[b], greedy)
            running[slot], out[b] = b, [token]
        slots = list(running)
        for slot, token in zip(slots, decoder.decode(slots)):
            out[running[slot]].append(token)
        for slot in slots:  # prompt b stops after 3 + b tokens: sequences leave at different steps
            b = running[slot]
            if len(out[b]) == 3 + b:
                decoder.release(slot)
                del running[slot]
    assert [out[b] for b in range(len(PROMPTS))] == [a[:3 + b] for b, a in enumerate(alone)]


def test_a_seeded_row_does_not_depend_on_its_neighbours_or_their_parameters() -> None:
    m = model()
    seeded = Sampling(temperature=1.0, top_p=0.9, seed=42)
    alone = run_alone(m, PROMPTS[0], 8, seeded)
    decoder = SlotDecoder(m, 4)
    neighbours = [Sampling(temperature=0.7, top_k=5), Sampling(temperature=0), Sampling(temperature=1.3)]
    for p, s in zip(PROMPTS[1:], neighbours):
        decoder.prefill(p, s)
    slot, token = decoder.prefill(PROMPTS[0], seeded)
    tokens = [token]
    for _ in range(7):
        tokens.append(decoder.decode([0, 1, slot, 2])[2])
    assert tokens == alone
    assert run_alone(m, PROMPTS[0], 8, Sampling(temperature=1.0, top_p=0.9, seed=43)) != alone


@pytest.mark.parametrize("temperature", [1e-40, 1e-50, 5e-324])
def test_a_vanishing_temperature_is_greedy_not_nan(temperature: float) -> None:
    m = model()
    tiny = run_alone(m, PROMPTS[0], 6, Sampling(temperature=temperature, seed=0))
    assert tiny == run_alone(m, PROMPTS[0], 6, Sampling(temperature=0))
    logits = torch.tensor([[3.0, 1.0, 3.0 - 1e-3, -50.0], [1e4, -1e4, 0.0, 0.0]])
    probs = filtered_probs(logits, [Sampling(temperature=temperature)] * 2)
    assert torch.isfinite(probs).all() and probs.argmax(-1).tolist() == [0, 0]


def test_filters_top_k_and_top_p_per_row() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    probs = filtered_probs(logits, [Sampling(top_k=2), Sampling(top_p=0.7), Sampling(top_k=3, top_p=0.99)])
    assert probs[0].tolist() == pytest.approx([0.625, 0.375, 0, 0])
    assert probs[1].tolist() == pytest.approx([0.625, 0.375, 0, 0])  # 0.5 + 0.3 already hold 0.7
    assert probs[2].tolist() == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    huge_k = filtered_probs(logits[:1], [Sampling(top_k=10**30)])  # no cut, and no integer overflow
    assert huge_k[0].tolist() == pytest.approx([0.5, 0.3, 0.15, 0.05])
    greedy_row = sample_rows(logits[:1], [Sampling(temperature=0)], [None])
    assert greedy_row.tolist() == [0]


def test_slot_pool_errors_are_clear() -> None:
    m = model()
    decoder = SlotDecoder(m, 1, cache_length=4)
    slot, _ = decoder.prefill([1, 2, 3], Sampling(temperature=0))
    with pytest.raises(RuntimeError, match="no free slot"):
        decoder.prefill([1], Sampling(temperature=0))
    decoder.decode([slot])
    with pytest.raises(ValueError, match="slot 0 is full"):
        decoder.decode([slot])
    decoder.release(slot)
    with pytest.raises(ValueError, match="slot 0 is not in use"):
        decoder.release(slot)
    with pytest.raises(ValueError, match="temperature=nan must be a finite number"):
        decoder.prefill([1], Sampling(temperature=float("nan")))
    assert decoder.free_slots == 1  # a refused prompt does not keep its slot
    with pytest.raises(ValueError, match="a prompt of 5 tokens does not fit a slot of 4 positions"):
        decoder.prefill([1] * 5)
