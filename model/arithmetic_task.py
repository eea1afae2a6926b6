"""The GRPO task: multi-digit addition and multiplication with a verifiable answer.

Prompt: "<a><op><b>=" (byte tokens after bos), e.g. "123*45=". The answer follows the "=" marker
that ends the prompt: the response is the canonical decimal result, then eos ("5535" eos).
Problems are drawn on the fly from a seeded random.Random; a fixed held-out set (its own seed)
is never drawn for training.

Reward of a response (token ids, read up to its first eos):
    REWARD_EXACT  (1.0)  the exact answer;
    REWARD_FORMAT (0.1)  well-formed but wrong: ASCII digits only, no leading zero, at most
                         max_answer_digits of them, terminated by eos;
    0                    anything else (no eos: truncated; empty; a sign, a space, a non-ASCII or
                         non-byte token, too many digits). The parser compares strings, never
                         converts to int (Python refuses int() of > 4300 digits), and never raises.
"""
import dataclasses
import operator
import random
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence

from model.generate import ByteTokenizer

REWARD_EXACT = 1.0
REWARD_FORMAT = 0.1
MARKER = "="
OPS: Dict[str, Callable[[int, int], int]] = {"+": operator.add, "*": operator.mul}
_DIGIT_BYTES = range(ord("0"), ord("9") + 1)


@dataclasses.dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}{self.op}{self.b}{MARKER}"

    @property
    def answer(self) -> str:
        return str(OPS[self.op](self.a, self.b))


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
    """Operands of min_digits..max_digits digits (the count uniform, then the value), ops from `ops`;
    byte tokens with the model's bos / eos ids."""

    bos_id: int
    eos_id: int
    min_digits: int = 2
    max_digits: int = 4
    ops: str = "+*"

    def __post_init__(self):
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"ArithmeticTask: expected 1 <= min_digits <= max_digits, got min_digits="
                             f"{self.min_digits}, max_digits={self.max_digits}")
        if not self.ops or any(op not in OPS for op in self.ops):
            raise ValueError(f"ArithmeticTask.ops = {self.ops!r}: expected a non-empty string of {sorted(OPS)}")
        for name in ("bos_id", "eos_id"):
            if getattr(self, name) is None or getattr(self, name) < 256:
                raise ValueError(f"ArithmeticTask.{name} = {getattr(self, name)!r}: byte tokens take ids 0..255, "
                                 "the model needs its own bos/eos ids >= 256 (e.g. the tiny preset's 256, 257)")

    @property
    def max_answer_digits(self) -> int:
        largest = 10 ** self.max_digits - 1
        return max(len(str(OPS[op](largest, largest))) for op in self.ops)

    @property
    def max_response_tokens(self) -> int:
        """The longest well-formed response: the longest answer and its eos."""
        return self.max_answer_digits + 1

    def random_problem(self, rng: random.Random) -> Problem:
        def operand() -> int:
            digits = rng.randint(self.min_digits, self.max_digits)
            return rng.randint(10 ** (digits - 1), 10 ** digits - 1)

        return Problem(operand(), rng.choice(self.ops), operand())

    def sample(self, n: int, rng: random.Random, exclude: FrozenSet[Problem] = frozenset()) -> List[Problem]:
        """n problems, none of them in `exclude` (the held-out set)."""
        out: List[Problem] = []
        while len(out) < n:
            problem = self.random_problem(rng)
            if problem not in exclude:
                out.append(problem)
        return out

    def held_out(self, n: int, seed: int) -> List[Problem]:
        """A fixed evaluation set of n distinct problems (the same for the same task and seed)."""
        rng, seen = random.Random(seed), {}
        while len(seen) < n:
            seen.setdefault(self.random_problem(rng), None)
        return list(seen)

    # --- tokens ----------------------------------------------------------------------------------
    def encode_prompt(self, problem: Problem) -> List[int]:
        return ByteTokenizer(self.bos_id, self.eos_id).encode(problem.prompt)

    def encode_answer(self, problem: Problem) -> List[int]:
        """The target response: answer bytes, then eos."""
        return list(problem.answer.encode("ascii")) + [self.eos_id]

    # --- reward ----------------------------------------------------------------------------------
    def parse_answer(self, response: Sequence[int]) -> Optional[str]:
        """The answer of a well-formed response, else None (never raises)."""
        if not isinstance(response, (list, tuple)):
            return None
        body = []
        for token in response:
            if not isinstance(token, int) or isinstance(token, bool):
                return None
            if token == self.eos_id:
                break
            if token not in _DIGIT_BYTES or len(body) == self.max_answer_digits:
                return None
            body.append(token)
        else:
            return None  # no eos: truncated
        if not body or (body[0] == ord("0") and len(body) > 1):
            return None
        return bytes(body).decode("ascii")

    def reward(self, problem: Problem, response: Sequence[int]) -> float:
        answer = self.parse_answer(response)
        if answer is None:
            return 0.0
        return REWARD_EXACT if answer == problem.answer else REWARD_FORMAT
