"""A scripted environment whose replies do not depend on the model's quality: guess-the-number.

It answers "higher", "lower" or "no number found" to each turn and ends the episode on a right
guess. `delay` seconds of sleep per step stand for a slow tool. `PrefillProbe` records the
engine's prefill counter at each step (meaningful with one episode in flight).
"""

import re
import time


class GuessTheNumber:
    def __init__(self, delay: float = 0.0, probe=None):
        self.delay = delay
        self.probe = probe
        self.target = None

    def reset(self, prompt, target: int = 37):
        self.target = target
        return None

    def step(self, completion_text, completion_ids):
        if self.probe is not None:
            self.probe.append(self.probe.llm.metrics()["prefill_tokens"])
        if self.delay:
            time.sleep(self.delay)
        found = re.search(r"-?\d+", completion_text)
        if found is None:
            return {"role": "user", "content": "no number found"}, 0.0, False
        guess = int(found.group())
        if guess == self.target:
            return None, 1.0, True
        return {"role": "user", "content": "higher" if guess < self.target else "lower"}, 0.0, False


class PrefillProbe(list):
    def __init__(self, llm):
        super().__init__()
        self.llm = llm


PROMPT = "I picked a number between 1 and 100. Guess it: answer with one number."
