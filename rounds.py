"""--seeds auto: the Ray Tune searcher (`Rounds`) that runs a sweep's seeds in rounds inside one Tune experiment and
stops once every pair of variants is decided (verdicts.py) or the most seeds are spent.

A round is `round_seeds` seeds (the first at least 2: a verdict needs 2) of every variant still in an undecided pair,
as many trials as the cluster runs at once. After each round every undecided pair is tested at the alpha the look
spends (Lan-DeMets, O'Brien-Fleming-type: spent(t_k) - spent(t_k-1), t = seeds done / max seeds), Holm over the pairs
tested (verdicts.decide). A variant with a trial that failed (no retry left) or diverged gets no more seeds: its
undecided pairs stay undecided and leave the family. The state is builtins only (experiments.unpickled_state), saved
with Tune's experiment state, so a --resume goes on in the round it was stopped in."""
import itertools
import pickle
from pathlib import Path

import numpy as np
from ray.tune.search import Searcher

import experiments
import verdicts

STATE_FORMAT = 1  # the saved state's layout; another is refused


class Rounds(Searcher):
    """Hands out a round's trials ({"variant": dict, "seed": k}, merged into the sweep's param space), None while
    the round runs, then looks, and Searcher.FINISHED once every pair is decided or max_seeds are spent."""

    def __init__(self, variants: list, epochs: int, max_seeds: int, round_seeds: int, margin: float = verdicts.MARGIN,
                 alpha: float = verdicts.ALPHA):
        super().__init__()
        if len(variants) < 2:
            raise ValueError(f"--seeds auto decides pairs of variants; got {len(variants)} variant(s)")
        # seeds: of the rounds started; queue: [variant index, seed] not handed out yet; handed: trial id -> [variant
        # index, seed]; running: trial ids handed out, not complete; correct / broken: "variant/seed" -> its packed
        # correctness / why it has none; undecided: [a, b] pairs still tested; verdicts: "A | B" -> [verdict, points,
        # seeds]; dropped: variants out of the rounds; looks: [seeds, alpha level]; stopped: why it stopped, or None
        self.state = dict(format=STATE_FORMAT, variants=list(variants), epochs=epochs, max_seeds=max_seeds,
                          round_seeds=round_seeds, first_round=min(max_seeds, max(2, round_seeds)), margin=margin,
                          alpha=alpha, seeds=0, queue=[], handed={}, running=[], correct={}, broken={},
                          undecided=[list(pair) for pair in itertools.combinations(range(len(variants)), 2)],
                          verdicts={}, dropped=[], spent=0.0, looks=[], stopped=None)
        self._next_round(self.state["first_round"])

    def label(self, index: int) -> str:
        return experiments.variant_label({"variant": self.state["variants"][index]})

    def suggest(self, trial_id: str):
        state = self.state
        if state["stopped"]:
            return Searcher.FINISHED
        if not state["queue"]:
            return None  # the round still runs
        variant, seed = state["queue"].pop(0)
        state["handed"][trial_id] = [variant, seed]
        state["running"].append(trial_id)
        return {"variant": dict(state["variants"][variant]), "seed": seed}

    def on_trial_result(self, trial_id: str, result: dict):
        """Keep a trial's last epoch as it is reported: a trial a --resume restores from a checkpoint older than its
        last epoch (one the driver had not yet taken in) completes with that checkpoint's result, Tune's
        last_result, as its later epochs are logged already and not reported again."""
        if trial_id in self.state["handed"] and self._healthy_and_done(result):
            self.state["correct"][self._key(trial_id)] = result[experiments.CORRECT_KEY]

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        """Keep a finished trial's correctness, or why it has none; look once the round's last trial is in. A trial
        --resume reruns (it had failed) is taken in again: its variant stays out of the rounds it missed."""
        state = self.state
        if trial_id not in state["handed"]:
            return
        key, result = self._key(trial_id), result or {}
        state["running"] = [t for t in state["running"] if t != trial_id]
        health = result.get(experiments.HEALTH_KEY, "ok")
        if not error and self._healthy_and_done(result):
            state["correct"][key] = result[experiments.CORRECT_KEY]
        if error or health != "ok" or key not in state["correct"]:
            state["broken"][key] = "failed" if error else "diverged" if health != "ok" else "stopped early"
            state["correct"].pop(key, None)
        else:
            state["broken"].pop(key, None)
        if not state["running"] and not state["queue"] and not state["stopped"]:
            self._look()

    def _key(self, trial_id: str) -> str:
        return "{}/{}".format(*self.state["handed"][trial_id])  # "variant index/seed"

    def _healthy_and_done(self, result: dict) -> bool:
        return (result.get(experiments.HEALTH_KEY, "ok") == "ok" and experiments.CORRECT_KEY in result
                and experiments.trial_finished(result, self.state["epochs"]))

    def _look(self):
        """Test the undecided pairs on the seeds so far, then stop or queue the next round."""
        state, seeds = self.state, self.state["seeds"]
        out = {int(key.split("/")[0]) for key in state["broken"]}
        leaving = [pair for pair in state["undecided"] if set(pair) & out]  # they leave the family, undecided
        state["dropped"] = sorted(set(state["dropped"]) | (set().union(*leaving) & out))
        state["undecided"] = [pair for pair in state["undecided"] if pair not in leaving]
        if seeds >= 2 and state["undecided"]:
            tested = sorted({v for pair in state["undecided"] for v in pair})
            correct = {self.label(v): np.stack([experiments.unpacked_correct(state["correct"][f"{v}/{seed}"])
                                                for seed in range(seeds)]) for v in tested}
            pairs = {(self.label(a), self.label(b)): [a, b] for a, b in state["undecided"]}
            undecided = set(pairs)
            found, level = verdicts.look(correct, undecided, seeds / state["max_seeds"], state["spent"],
                                         state["margin"], state["alpha"])
            state["verdicts"].update({" | ".join(pair): [verdict, round(float(difference.points), 4), seeds]
                                      for pair, (verdict, difference) in found.items()})
            state["spent"] += level
            state["undecided"] = [pairs[pair] for pair in pairs if pair in undecided]
            state["looks"].append([seeds, level])
        if not state["undecided"]:
            dropped = ", ".join(map(self.label, state["dropped"]))
            state["stopped"] = "every pair decided" + (f" but those of {dropped} (a trial failed or diverged: no "
                                                       f"more seeds for it)" if dropped else "")
        elif seeds >= state["max_seeds"]:
            state["stopped"] = f"--max-seeds {state['max_seeds']} spent, {len(state['undecided'])} pair(s) undecided"
        else:
            self._next_round(state["round_seeds"])

    def _next_round(self, n_seeds: int):
        state = self.state
        seeds = range(state["seeds"], min(state["seeds"] + n_seeds, state["max_seeds"]))
        variants = sorted({v for pair in state["undecided"] for v in pair})
        state["queue"] = [[v, seed] for seed in seeds for v in variants]  # a seed's variants together
        state["seeds"] = seeds.stop

    def save(self, checkpoint_path: str):
        Path(checkpoint_path).write_bytes(pickle.dumps(self.state, protocol=4))

    def restore(self, checkpoint_path: str):
        state = experiments.unpickled_state(Path(checkpoint_path).read_bytes())
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"a --seeds auto searcher state of format {state.get('format')}, this one reads "
                             f"{STATE_FORMAT}")
        self.state = state


def stop_line(state: dict) -> str:
    """The CLI's closing line of a --seeds auto sweep ("" while its searcher has not stopped)."""
    if not state.get("stopped"):
        return ""
    return f"seeds auto: stopped after {state['seeds']} seed(s): {state['stopped']}"
