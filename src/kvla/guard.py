"""A live fidelity guard for any reuse method.

At a cadence (every `every` steps, and, with `on_change`, whenever more than that share of the
visual tokens changed since the last step), the guard runs the step fully as well, from nothing
cached, and compares the accelerated actions with the full ones. When the mean absolute action
deviation passes `bound`, the full step's K/V become the episode's cache (a refresh), its actions
are the ones returned, and reuse is tightened: no visual token older than the guard's maximum
age is reused. At a breach that age becomes `start_age` (first breach) or half the current one, and
never more than half the oldest age the breached step reused, so that it bites on a method that
limits age itself (`lac` reuses only the previous call's K/V: its first breach stops reuse); 1 step
reuses nothing. After
`relax_after` checks in a row within the bound, the age doubles again, and past `start_age` the
cap is lifted.

Its state lives in the episode state (`state.method_memory["guard"]`), so reset() clears it; each
step reports its decision in `StepOutput.notes["guard"]`, and `summary()` sums up the episode.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FidelityGuard:
    every: int = 10  # check every N steps (0: only on scene change)
    bound: float = 0.02  # mean |action - full's action| (actions in [-1, 1]) that counts as a breach
    on_change: float = 0.0  # also check when more than this share of visual tokens changed (0: off)
    start_age: int = 8  # the maximum age imposed at the first breach
    relax_after: int = 3  # checks in a row within the bound before the age doubles again

    def __post_init__(self):
        if self.every < 0 or self.bound < 0 or not 0.0 <= self.on_change <= 1.0:
            raise ValueError("every and bound must be >= 0 and on_change in [0, 1]")
        if self.every == 0 and self.on_change == 0.0:
            raise ValueError("the guard would never check: give every > 0 or on_change > 0")
        if self.start_age < 1 or self.relax_after < 1:
            raise ValueError("start_age and relax_after must be >= 1")

    @staticmethod
    def memory(state) -> dict:
        return state.method_memory.setdefault("guard", {
            "max_age": None, "within": 0, "checks": 0, "breaches": 0, "deviations": [], "agreements": [],
            "guard_ms": 0.0, "step_ms": 0.0, "steps": 0})

    def should_check(self, state, changed_share: float | None) -> bool:
        if state.step == 0:
            return False  # the first step of an episode is full already
        if self.every and state.step % self.every == 0:
            return True
        return bool(self.on_change and changed_share is not None and changed_share > self.on_change)

    def cap(self, state, depth, num_layers):
        """Apply the current maximum age to a plan's depths: older reused tokens are recomputed."""
        max_age = self.memory(state)["max_age"]
        if max_age is None or state.source_step is None:
            return depth
        too_old = (state.token_age() >= max_age).to(depth.device)
        return depth.masked_fill(too_old, num_layers)

    def record(self, state, deviation: float, agreement: float, oldest_reused: int | None = None) -> bool:
        """Book a check; returns whether it breached the bound (and tighten or relax the age).
        oldest_reused: the largest age of a token the checked step reused (None: it reused none)."""
        memory = self.memory(state)
        memory["checks"] += 1
        memory["deviations"].append(deviation)
        memory["agreements"].append(agreement)
        if deviation > self.bound:
            memory["breaches"] += 1
            memory["within"] = 0
            limit = self.start_age if memory["max_age"] is None else memory["max_age"] // 2
            if oldest_reused is not None:
                limit = min(limit, oldest_reused // 2)
            memory["max_age"] = max(1, limit)
            return True
        memory["within"] += 1
        if memory["max_age"] is not None and memory["within"] >= self.relax_after:
            memory["within"] = 0
            memory["max_age"] = None if memory["max_age"] * 2 > self.start_age else memory["max_age"] * 2
        return False

    def summary(self, state) -> dict:
        memory = self.memory(state)
        deviations = memory["deviations"]
        return {"steps": memory["steps"], "checks": memory["checks"], "breaches": memory["breaches"],
                "mean_deviation": sum(deviations) / len(deviations) if deviations else None,
                "max_deviation": max(deviations) if deviations else None,
                "mean_token_agreement": (sum(memory["agreements"]) / len(memory["agreements"])
                                         if memory["agreements"] else None),
                "max_age_now": memory["max_age"],
                "guard_share_of_step": memory["guard_ms"] / memory["step_ms"] if memory["step_ms"] else 0.0}


GUARD_SEPARATOR = "|guard"


def split_guard(spec: str) -> tuple[str, FidelityGuard | None]:
    """"vla_cache:tau=0.99|guard:every=10:bound=0.02" -> ("vla_cache:tau=0.99", FidelityGuard(10, 0.02));
    a spec without "|guard" -> (spec, None). The CLI's --methods take such specs."""
    import typing

    from kvla.methods.base import _coerce

    if GUARD_SEPARATOR not in spec:
        return spec, None
    method, guard = spec.split(GUARD_SEPARATOR, 1)
    kwargs = {}
    hints = typing.get_type_hints(FidelityGuard)
    for item in (s for s in guard.split(":") if s):
        key, sep, value = item.partition("=")
        if not sep or key not in hints:
            raise ValueError(f"bad guard setting {item!r}; settings: {', '.join(hints)}")
        kwargs[key] = _coerce(value, hints[key], key)
    return method, FidelityGuard(**kwargs)


def parse_guarded(spec: str):
    """A "METHOD|guard:..." spec -> (the ReuseMethod, the FidelityGuard or None)."""
    from kvla.methods import parse_method

    method, guard = split_guard(spec)
    return parse_method(method), guard


def guard_settings(specs: list[str]) -> dict:
    """{spec: the guard's settings} of the specs that carry one (what a receipt records)."""
    import dataclasses

    return {spec: dataclasses.asdict(guard) for spec in specs if (guard := split_guard(spec)[1]) is not None}


def guard_label(guard: FidelityGuard | None) -> str:
    """The guard part of a method's label ('' for none): its settings that differ from the defaults."""
    import dataclasses

    if guard is None:
        return ""
    changed = [f"{f.name}={getattr(guard, f.name)}" for f in dataclasses.fields(guard)
               if getattr(guard, f.name) != f.default]
    return GUARD_SEPARATOR + "".join(f":{c}" for c in changed)
