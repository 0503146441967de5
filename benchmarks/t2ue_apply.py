"""Apply throughput of T2UE against the `random` control on the same shards, in one run.

Both run the whole `shard` job (read → decode → batch → protect → encode → write) in this
process, alternating (random, t2ue, random, t2ue) so that both see the same machine state;
the ratio of the best runs is the figure. T2UE's cost over `random` is the caption encoder
(once per unique caption) and the generator.

    .venv/bin/python benchmarks/t2ue_apply.py --artifact ARTIFACT [--data DIR] [--rounds 2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from uge_protect.pipeline import ShardJobConfig, run_shard_job  # noqa: E402
from uge_protect.methods.registry import create_method  # noqa: E402


def timed(inputs: list[str], out: Path, method: str, artifact: str | None) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cfg = ShardJobConfig(inputs=inputs, output=str(out), quiet=True)
    m = create_method(method, artifact=artifact) if artifact else create_method(method)
    start = time.perf_counter()
    summary = run_shard_job(cfg, m)
    return summary["counts"]["written"] / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True, help="a `fit t2ue` artifact")
    p.add_argument("--data", default="bench_output/efficacy_protocol/demo/data", help="demo data (train/*.tar)")
    p.add_argument("--work", default="bench_output/t2ue_apply")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    inputs = sorted(str(x) for x in Path(a.data, "train").glob("*.tar"))
    if not inputs:
        raise SystemExit(f"no shards under {a.data}/train (write them with `uge-protect demo-data`)")
    work = Path(a.work)
    best = {"random": 0.0, "t2ue": 0.0}
    for r in range(a.rounds):
        for method in ("random", "t2ue"):
            ips = timed(inputs, work / method, method, a.artifact if method == "t2ue" else None)
            best[method] = max(best[method], ips)
            print(f"round {r + 1}: {method} {ips:.0f} img/s", flush=True)
    print(f"best: random {best['random']:.0f} img/s, t2ue {best['t2ue']:.0f} img/s, "
          f"ratio {best['t2ue'] / best['random']:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
