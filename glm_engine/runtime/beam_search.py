"""One request's beam search, step for step as Hugging Face `generate` (transformers
5.x) does it, so that tokens and scores can be compared with it: each step takes the
2 * num_beams best continuations of the running beams by cumulative log-probability,
keeps the best num_beams that do not end as the running beams, and files those among
the first num_beams that end (the end token, or the length limit) as finished
hypotheses scored by cumulative log-probability / generated length ** length_penalty.
early_stopping: True stops once num_beams hypotheses are finished; False (Hugging
Face's default) and "never" stop when no running beam can beat the worst finished
one, by Hugging Face's estimate."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

UNREACHABLE = -1.0e9  # Hugging Face's score of an empty or barred slot


@dataclass
class Beam:
    """A running beam: its generated tokens and cumulative log-probability."""

    output: list[int]
    score: float


@dataclass
class BeamSearch:
    num_beams: int
    length_penalty: float
    early_stopping: bool | str
    end_id: int
    prompt_length: int
    max_new_tokens: int
    beams: list[Beam] = field(default_factory=list)
    finished: list[tuple[float, list[int]]] = field(default_factory=list)  # best first, at most num_beams
    improvable: bool = True  # Hugging Face's is_early_stop_heuristic_unsatisfied
    done: bool = False

    def __post_init__(self) -> None:
        # As Hugging Face's: num_beams copies of the prompt, all but the first out of reach.
        self.beams = [Beam([], 0.0)] + [Beam([], UNREACHABLE) for _ in range(self.num_beams - 1)]

    def step(self, log_probs: torch.Tensor) -> list[int]:
        """Advances by one token given float32 log-probabilities [num_beams, vocab] of the
        running beams' next token (one row standing for all at the first step, when the
        beams are copies of the prompt). Returns, for each new running beam, the index of
        the beam it continues. Three reads to the host: the candidates, the finished and
        the running beams kept."""
        if log_probs.shape[0] == 1 and self.num_beams > 1:
            log_probs = log_probs.expand(self.num_beams, -1)
        vocab = log_probs.shape[1]
        scores = torch.tensor([beam.score for beam in self.beams], dtype=torch.float32, device=log_probs.device)
        candidates, indices = torch.topk((log_probs + scores[:, None]).reshape(-1), 2 * self.num_beams)
        flat = indices.tolist()
        parents, tokens = [index // vocab for index in flat], [index % vocab for index in flat]
        length = len(self.beams[0].output) + 1  # generated tokens once this step's is added
        ending = [token == self.end_id or length >= self.max_new_tokens for token in tokens]
        ends = torch.tensor(ending, device=candidates.device)
        self._file_finished(candidates, ends, ending, parents, tokens, length)
        picked, values = _read_top(torch.topk(candidates + ends.float() * UNREACHABLE, self.num_beams))
        self.beams = [Beam(self.beams[parents[i]].output + [tokens[i]], score) for i, score in zip(picked, values)]
        self._check_done(values[0], ending, length)
        return [parents[i] for i in picked]

    def _file_finished(self, candidates: torch.Tensor, ends: torch.Tensor, ending: list[bool], parents: list[int],
                       tokens: list[int], length: int) -> None:
        """Merges the ending candidates among the first num_beams into the finished ones
        (`ending`: `ends` on the host)."""
        top = torch.arange(len(tokens), device=candidates.device) < self.num_beams
        scores = candidates / (length ** self.length_penalty)
        full = len(self.finished) == self.num_beams and self.early_stopping is True
        scores = scores + float(full) * UNREACHABLE + float(not self.improvable) * UNREACHABLE
        scores = scores + (~(ends & top)).float() * UNREACHABLE
        slots = [score for score, _ in self.finished] + [UNREACHABLE] * (self.num_beams - len(self.finished))
        merged = torch.cat([torch.tensor(slots, dtype=torch.float32, device=candidates.device), scores])
        kept, kept_scores = _read_top(torch.topk(merged, self.num_beams))
        filed = []
        for score, index in zip(kept_scores, kept):
            candidate = index - self.num_beams  # top[candidate] is candidate < num_beams
            if index < len(self.finished):
                filed.append(self.finished[index])
            elif 0 <= candidate < self.num_beams and ending[candidate]:
                filed.append((score, self.beams[parents[candidate]].output + [tokens[candidate]]))
        self.finished = filed

    def _check_done(self, best_running: float, ending: list[bool], length: int) -> None:
        """Hugging Face's stopping rule (_check_early_stop_heuristic and
        _beam_search_has_unfinished_sequences)."""
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_new_tokens
        else:
            best_length = length
        best_possible = best_running / (best_length ** self.length_penalty)
        full = len(self.finished) == self.num_beams
        worst = min(score for score, _ in self.finished) if full else UNREACHABLE
        self.improvable = self.improvable and best_possible > worst
        all_finished = full and self.early_stopping is True
        self.done = not (self.improvable and not all_finished and not all(ending))

    def results(self, count: int = 1) -> list[tuple[list[int], float]]:
        """The best `count` finished hypotheses (tokens without a final end token, score)."""
        return [(tokens[:-1] if tokens[-1] == self.end_id else tokens, score) for score, tokens in self.finished[:count]]


def _read_top(top: torch.return_types.topk) -> tuple[list[int], list[float]]:
    """A topk's indices and float32 values on the host, in one read (both exact in float64)."""
    values, indices = torch.stack([top.values.double(), top.indices.double()]).tolist()
    return [int(index) for index in indices], values


@dataclass(eq=False)
class BeamGroup:
    """A beam request in the scheduler: its search and the scheduler's sequences of its
    running beams (one, the prompt, until the first step; num_beams after)."""

    search: BeamSearch
    sequences: list = field(default_factory=list)
