"""Closed-loop results of `kvla eval --episodes-json` split by task variant (the `@perturbation`
suffix, "plain" for none): per method its success, the paired difference from `full` over the same
(task, seed) episodes with its Newcombe interval, mean reuse, the speed-up (`full`'s median step
over the method's, of the per-episode medians), and the fidelity guard's checks, breaches, mean
action deviation from `full` at its checks and share of the step. Prints markdown tables.

    python scripts/success_by_variant.py runs/eval_photometric_guard_episodes.json [more.json ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

from kvla.measure.stats import paired_difference


def variant_of(task: str) -> str:
    return task.split("@")[1] if "@" in task else "plain"


def tables(episodes: list[dict]) -> str:
    by_variant: dict[str, dict[str, dict[tuple, dict]]] = defaultdict(lambda: defaultdict(dict))
    for episode in episodes:
        runs, key = by_variant[variant_of(episode["task"])][episode["method"]], (episode["task"], episode["seed"])
        if key in runs:
            raise ValueError(f"{episode['method']} ran {key} twice: pool files of different seeds only")
        runs[key] = episode
    variants = sorted(by_variant, key=lambda v: (v != "all", v))
    if len(variants) > 1:  # every variant together as well
        merged = defaultdict(dict)
        for variant in variants:
            for method, runs in by_variant[variant].items():
                merged[method].update(runs)
        by_variant["all"] = merged
        variants = ["all", *variants]
    lines = []
    for variant in variants:
        methods = by_variant[variant]
        if "full" not in methods:
            raise ValueError(f"no `full` episodes for variant {variant}: nothing to pair against")
        reference = methods["full"]
        keys = sorted(reference)
        full_step = statistics.median(reference[k]["step_ms_median"] for k in keys)
        lines += [f"\n{variant} ({len(keys)} episodes per method)\n",
                  "| method | success | vs full, paired (95 % CI) | reuse | speed-up | guard checks / breaches | "
                  "deviation at checks | guard share |", "|---|---|---|---|---|---|---|---|"]
        for method, runs in methods.items():
            missing = [k for k in keys if k not in runs]
            if missing:
                raise ValueError(f"{method} lacks {len(missing)} of full's episodes in {variant}, e.g. {missing[0]}")
            rows = [runs[k] for k in keys]
            success = [r["success"] for r in rows]
            diff, (low, high) = paired_difference(success, [reference[k]["success"] for k in keys])
            step = statistics.median(r["step_ms_median"] for r in rows)
            reuse = statistics.fmean(r["reuse_ratio"] for r in rows)
            guards = [r["guard"] for r in rows if r.get("guard")]
            checked = [g for g in guards if g["checks"]]
            checks = sum(g["checks"] for g in checked)
            guard = (f"{checks} / {sum(g['breaches'] for g in guards)}",
                     # over every check: the episode means weighted by their checks
                     f"{sum(g['mean_deviation'] * g['checks'] for g in checked) / checks:.3f}" if checks else "-",
                     f"{100 * statistics.fmean(g['guard_share_of_step'] for g in guards):.1f} %") if guards else ("-",) * 3
            name = method.replace("|", "\\|")  # a guarded method's `|` would split the markdown cell
            lines.append(f"| {name} | {100 * statistics.fmean(success):.1f} % | "
                         + ("-" if method == "full" else f"{100 * diff:+.1f} ({100 * low:+.1f}..{100 * high:+.1f})")
                         + f" | {100 * reuse:.1f} % | {full_step / step:.2f}x | {' | '.join(guard)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("episodes_json", nargs="+", help="one or more --episodes-json files (their episodes pooled)")
    parser.add_argument("--methods", help="keep only these method labels (comma-separated; full is always kept), "
                                          "to pool files whose runs share only some methods")
    args = parser.parse_args()
    episodes = []
    for path in args.episodes_json:
        with open(path) as handle:
            episodes += json.load(handle)
    if args.methods:
        keep = {"full", *args.methods.split(",")}
        episodes = [e for e in episodes if e["method"] in keep]
    print(tables(episodes))


if __name__ == "__main__":
    main()
