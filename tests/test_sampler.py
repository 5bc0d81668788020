"""The sampler against a plain-PyTorch reference, one row at a time, on random logits:
greedy, penalized, bad-word, minimum-length and seeded sampled rows and their
log-probs, in batches of one kind and of mixed kinds, over several steps (the
penalty counts follow the chosen tokens); rows still reading a prompt keep the
argmax and take no penalty slot; beam requests get their searches' parents; a step
reads the device once (plus beam search's own reads)."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from glm_engine.runtime import sampler as sampler_module
from glm_engine.runtime.beam_search import BeamGroup, BeamSearch
from glm_engine.runtime.sampler import Sampler
from glm_engine.runtime.sampling import SamplingConfig, nucleus_logits, sample_rows
from glm_engine.runtime.scheduler import Sequence, StepPlan

VOCAB = 40
END = 2
KINDS = {
    "greedy": dict(),
    "repetition": dict(repetition_penalty=1.7),
    "repetition_below_one": dict(repetition_penalty=0.6),
    "presence_frequency": dict(presence_penalty=0.9, frequency_penalty=0.5),
    "min_length": dict(min_length=50),
    "bad_words": dict(),  # words made from each sequence's own tail (make_sequence)
    "sampled": dict(top_k=0, temperature=0.8),
    "sampled_nucleus": dict(top_k=6, top_p=0.7, temperature=1.3),
    "sampled_penalized": dict(top_k=0, temperature=1.1, repetition_penalty=1.4, presence_penalty=0.3, min_length=50),
    "log_probs": dict(output_log_probs=True, frequency_penalty=0.4),
    "log_probs_sampled": dict(output_log_probs=True, top_k=10, top_p=0.9, temperature=0.7),
}


def make_sequence(index: int, kind: str, rng: random.Random) -> Sequence:
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))]
    output = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 6))]
    options = dict(KINDS[kind])
    if kind == "bad_words":
        tail = (prompt + output)[-2:]
        # A single token, words completed by the tail (one across the prompt's end when the
        # output is short) and one that is not.
        options["bad_words"] = ((rng.randrange(VOCAB),), (tail[-1], rng.randrange(VOCAB)),
                                (*tail, rng.randrange(VOCAB)), ((tail[-1] + 1) % VOCAB, 0, rng.randrange(VOCAB)))
    sampling = SamplingConfig(max_new_tokens=100, end_id=END, **options)
    return Sequence(index, prompt, sampling, seed=rng.getrandbits(63), output=output)


def reference_logits(sequence: Sequence, logits: torch.Tensor) -> torch.Tensor:
    """One row's logits as the penalties, bad words and min_length define them."""
    sampling, row = sequence.sampling, logits.clone()
    counts = torch.bincount(torch.tensor(sequence.output, dtype=torch.long), minlength=VOCAB).float()
    seen = (counts > 0) | torch.isin(torch.arange(VOCAB), torch.tensor(sequence.prompt))
    penalty = sampling.repetition_penalty
    row = torch.where(seen, torch.where(row > 0, row / penalty, row * penalty), row)
    row = row - sampling.presence_penalty * (counts > 0).float() - sampling.frequency_penalty * counts
    tokens = sequence.prompt + sequence.output
    for word in sampling.bad_words:
        if len(word) == 1 or tokens[-(len(word) - 1):] == list(word[:-1]):
            row[word[-1]] = float("-inf")
    if len(sequence.output) < sampling.min_length:
        row[sampling.end_id] = float("-inf")
    return row


def reference_choice(sequence: Sequence, logits: torch.Tensor) -> tuple[int, float]:
    """One row's token and its log-probability under the distribution it came from."""
    sampling = sequence.sampling
    row = reference_logits(sequence, logits)
    if sampling.greedy:
        token = int(row.argmax())
        return token, float(row.log_softmax(-1)[token])
    token = int(sample_rows(row[None], [sampling], [sequence.seed], [len(sequence.output)])[0])
    return token, float(nucleus_logits(row[None], [sampling])[0].log_softmax(-1)[token])


BATCHES = {
    "one greedy": ["greedy"],
    "five greedy": ["greedy"] * 5,
    "one penalized": ["repetition"],
    "all penalties": ["repetition", "repetition_below_one", "presence_frequency", "min_length", "bad_words"],
    "sampled only": ["sampled", "sampled_nucleus", "sampled"],
    "every kind": list(KINDS),
    "every kind twice, shuffled": random.Random(1).sample(list(KINDS) * 2, 2 * len(KINDS)),
}


@pytest.mark.parametrize("kinds", BATCHES.values(), ids=BATCHES.keys())
@pytest.mark.parametrize("with_reading", [False, True], ids=["decoding", "some reading"])
def test_every_row_matches_the_per_row_reference(kinds, with_reading):
    """Four steps over one batch; each step's chosen tokens join the outputs, so the
    penalty counts must follow them."""
    rng = random.Random(len(kinds) * 10 + with_reading)
    torch.manual_seed(len(kinds))
    sequences = [make_sequence(index, kind, rng) for index, kind in enumerate(kinds)]
    reading = [with_reading and row % 3 == 1 for row in range(len(sequences))]
    sampler = Sampler(slots=len(sequences))
    for _ in range(4):
        logits = torch.randn(len(sequences), VOCAB) * 3
        greedy = logits.argmax(dim=-1)
        expected = [reference_choice(sequence, row) for sequence, row in zip(sequences, logits)]
        plan = StepPlan(sequences, [[0]] * len(sequences), reading=reading)
        sampled = sampler.sample(plan, logits, greedy)
        asks = any(sequence.sampling.output_log_probs for sequence in sequences)
        assert (sampled.log_probs is not None) == asks and sampled.beam_parents == {}
        for row, sequence in enumerate(sequences):
            if reading[row]:
                assert sampled.tokens[row] == int(greedy[row]) and sequence.penalty_slot is None
                continue
            assert sampled.tokens[row] == expected[row][0], (row, sequence.sampling)
            if sequence.sampling.output_log_probs:
                assert sampled.log_probs[row] == pytest.approx(expected[row][1], abs=1e-5)
            sequence.output.append(sampled.tokens[row])
    for sequence in sequences:  # the scheduler gives back a retired sequence's slot
        if sequence.penalty_slot is not None:
            sampler.give_back(sequence.penalty_slot)
    if sampler.history is not None:
        assert sorted(sampler.history.free) == list(range(len(sequences)))


def test_banned_and_held_back_tokens_are_never_chosen():
    """Bad words' last tokens and an early end token lose even at the top of the logits."""
    rng = random.Random(3)
    sequences = [make_sequence(index, kind, rng) for index, kind in
                 enumerate(["bad_words", "min_length", "sampled_penalized", "greedy"])]
    logits = torch.randn(4, VOCAB)
    logits[0, sequences[0].sampling.bad_words[1][-1]] = 100.0
    logits[1:, END] = 100.0
    sampled = Sampler(slots=4).sample(StepPlan(sequences, [[0]] * 4), logits, logits.argmax(dim=-1))
    assert sampled.tokens[0] != sequences[0].sampling.bad_words[1][-1]
    assert sampled.tokens[1] != END and sampled.tokens[2] != END and sampled.tokens[3] == END


def beam_group(prompt: list[int], num_beams: int, steps_done: int) -> BeamGroup:
    """A beam request after `steps_done` steps of a search over fixed random log-probs."""
    search = BeamSearch(num_beams, 1.0, False, END, len(prompt), 20)
    for step in range(steps_done):
        search.step(torch.randn(1 if step == 0 else num_beams, VOCAB).log_softmax(-1))
    sampling = SamplingConfig(max_new_tokens=20, end_id=END, num_beams=num_beams)
    group = BeamGroup(search)
    group.sequences = [Sequence(0, prompt, sampling, 0, output=list(beam.output), group=group)
                       for beam in search.beams[:1 if steps_done == 0 else num_beams]]
    return group


class HostReads:
    """Counts device-to-host reads of tensors (the ways a tensor's values reach Python)."""

    METHODS = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count, self.paused = 0, False
        for name in self.METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(getattr(torch.Tensor, name)))
        # The CPU draw (kernels/reference.py) loops on the host until every row is inside
        # its nucleus; the GPU's draw kernel reads nothing.
        if not torch.cuda.is_available():
            monkeypatch.setattr(sampler_module, "sample_rows", self._unread(sampler_module.sample_rows))

    def _counted(self, method):
        def counted(tensor, *args, **kwargs):
            if not self.paused:
                self.count += 1
            return method(tensor, *args, **kwargs)
        return counted

    def _unread(self, function):
        def unread(*args, **kwargs):
            self.paused = True
            try:
                return function(*args, **kwargs)
            finally:
                self.paused = False
        return unread


@pytest.mark.parametrize("kinds", BATCHES.values(), ids=BATCHES.keys())
def test_a_step_reads_the_device_once(monkeypatch, kinds):
    """Tokens and log-probs of every kind of row come back in one read."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = random.Random(5)
    sequences = [make_sequence(index, kind, rng) for index, kind in enumerate(kinds)]
    sampler = Sampler(slots=len(sequences))
    reads = HostReads(monkeypatch)
    for _ in range(2):  # the first step fills the penalty slots, the second reuses them
        logits = torch.randn(len(sequences), VOCAB, device=device)
        before = reads.count
        sampled = sampler.sample(StepPlan(sequences, [[0]] * len(sequences)), logits, logits.argmax(dim=-1))
        assert reads.count - before == 1
        for sequence, token in zip(sequences, sampled.tokens):
            sequence.output.append(token)


def test_beam_requests_get_their_searches_parents(monkeypatch):
    """Two beam requests (one at its first step, one row standing for its beams) beside
    greedy and penalized rows: each search steps on its rows' log-softmax, as a twin search
    fed them alone does; the step reads 1 + 3 per beam request."""
    torch.manual_seed(7)
    rng = random.Random(7)
    groups = [beam_group([5, 6, 7], 2, steps_done=0), beam_group([8, 9], 3, steps_done=2)]
    twins = [copy.deepcopy(group.search) for group in groups]
    sequences = [make_sequence(0, "greedy", rng), *groups[0].sequences, make_sequence(1, "repetition", rng),
                 *groups[1].sequences]
    logits = torch.randn(len(sequences), VOCAB)
    reads = HostReads(monkeypatch)
    sampled = Sampler(slots=len(sequences)).sample(StepPlan(sequences, [[0]] * len(sequences)), logits,
                                                   logits.argmax(dim=-1))
    assert reads.count == 1 + 3 * len(groups)
    assert list(sampled.beam_parents) == groups
    for group, twin in zip(groups, twins):
        rows = [row for row, sequence in enumerate(sequences) if sequence.group is group]
        assert sampled.beam_parents[group] == twin.step(logits[rows].log_softmax(dim=-1))
        assert group.search.beams == twin.beams and group.search.done == twin.done
    assert sampled.tokens[0] == int(logits[0].argmax())
