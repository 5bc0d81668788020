"""Beam search against Hugging Face generate's: the same tokens and scores of every returned
beam for 2 and 4 beams (1 beam is greedy), with and without a length penalty, each
early_stopping setting."""

from __future__ import annotations

import pytest
import torch

from glm_engine.runtime.beam_search import BeamSearch
from test_model import oracle, random_prompt


@pytest.fixture(scope="module")
def reference(tiny_checkpoint_factory):
    return oracle(tiny_checkpoint_factory("safetensors", seed=17))


def our_beam_search(model, prompt: list[int], search: BeamSearch) -> list[tuple[list[int], float]]:
    """BeamSearch driven by the reference model's log-probabilities (full recompute)."""
    with torch.no_grad():
        rows = model(torch.tensor([prompt])).logits[:, -1].float().log_softmax(-1)
        while True:
            search.step(rows)
            if search.done:
                return search.results(search.num_beams)
            batch = torch.tensor([prompt + beam.output for beam in search.beams])
            rows = model(batch).logits[:, -1].float().log_softmax(-1)


def hf_beam_search(model, prompt: list[int], num_beams: int, end_id: int, max_new_tokens: int, **setting):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), num_beams=num_beams, num_return_sequences=num_beams,
                             do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=end_id, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True, **setting)
    results = []
    for sequence, score in zip(out.sequences, out.sequences_scores):
        tokens = sequence[len(prompt):].tolist()
        if end_id in tokens:
            tokens = tokens[:tokens.index(end_id)]
        else:
            while tokens and tokens[-1] == 0 and len(tokens) > max_new_tokens:
                tokens.pop()
        results.append((tokens, float(score)))
    return results


@pytest.mark.parametrize("num_beams", [2, 4])
@pytest.mark.parametrize("setting", [{}, {"length_penalty": 0.0}, {"length_penalty": 2.0, "early_stopping": True},
                                     {"length_penalty": 1.5, "early_stopping": "never"}], ids=str)
def test_best_beams_and_scores_match_hugging_face(reference, num_beams, setting):
    for seed, length in ((1, 6), (2, 13)):
        prompt = random_prompt(length, seed)
        # An end token the model reaches within the limit for some beams: greedy's 5th token.
        with torch.no_grad():
            greedy = reference.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                        pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
        end_id = greedy[4]
        search = BeamSearch(num_beams, setting.get("length_penalty", 1.0), setting.get("early_stopping", False),
                            end_id, len(prompt), 12)
        ours = our_beam_search(reference, prompt, search)
        theirs = hf_beam_search(reference, prompt, num_beams, end_id, 12, **setting)
        assert [tokens for tokens, _ in ours] == [tokens for tokens, _ in theirs]
        assert torch.allclose(torch.tensor([score for _, score in ours]),
                              torch.tensor([score for _, score in theirs]), atol=1e-4)
