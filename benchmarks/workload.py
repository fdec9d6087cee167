"""The workloads shared by the benchmarks.

The default is GRPO-shaped: 32 chat prompts x 8 samples, T=1.0, up to 128
tokens. `LONG` is the long-completion shape: 16 prompts x 4 samples x 1024
tokens. Throughput runs set `ignore_eos` so every engine generates exactly
prompts x n x max_tokens tokens.
"""

from dataclasses import dataclass

QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis in one paragraph.",
    "Write a haiku about the sea.",
    "If a train travels 60 miles in 1.5 hours, what is its average speed?",
    "List three uses of a paperclip.",
    "What is 17 times 23? Show your reasoning.",
    "Give me a short tip for learning to cook.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet.",
    "What are the primary colors?",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish and French.",
    "Write a Python function that reverses a string.",
    "What is the difference between weather and climate?",
    "Name the planets of the solar system in order.",
    "Solve for x: 3x + 5 = 20.",
    "What causes the seasons on Earth?",
    "Describe a cat to someone who has never seen one.",
    "What is the boiling point of water at sea level in Fahrenheit?",
    "Suggest a name for a bakery.",
    "How do vaccines work?",
    "Write two sentences about autumn.",
    "What is a prime number? Give three examples.",
    "Why do we need sleep?",
    "A rectangle is 4 cm by 7 cm. What is its area and perimeter?",
    "What is the largest ocean on Earth?",
    "Give one reason to learn a second language.",
    "Explain what a computer algorithm is to a child.",
    "What is the square root of 144?",
    "Tell me a fun fact about octopuses.",
    "How does a rainbow form?",
    "Write a one-line motivational quote.",
]

NUM_GENERATIONS = 8
MAX_NEW_TOKENS = 128
TEMPERATURE = 1.0


@dataclass(frozen=True)
class Workload:
    name: str
    num_prompts: int
    n: int
    max_tokens: int
    temperature: float = TEMPERATURE
    ignore_eos: bool = True

    @property
    def num_seqs(self) -> int:
        return self.num_prompts * self.n

    @property
    def num_tokens(self) -> int:
        return self.num_seqs * self.max_tokens

    def describe(self) -> str:
        return (f"{self.name}: {self.num_prompts} chat prompts x n={self.n}, T={self.temperature}, "
                f"{self.max_tokens} new tokens{' (ignore_eos)' if self.ignore_eos else ''}, "
                f"{self.num_tokens} tokens")


GRPO = Workload("grpo", len(QUESTIONS), NUM_GENERATIONS, MAX_NEW_TOKENS)
LONG = Workload("long", 16, 4, 1024)


def conversations(num_prompts: int = len(QUESTIONS)) -> list[list[dict]]:
    return [[{"role": "user", "content": q}] for q in QUESTIONS[:num_prompts]]
