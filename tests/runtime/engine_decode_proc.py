"""A decode AsyncEngine in its own process (for tests/runtime/test_engine_pd_tp.py: one process
can be rank 0 of only one TP group).

stdin: one JSON object {"args": EngineArgs fields, "jobs": [{"prompt": ids, "kv": params,
"max_tokens": n}]}; stdout: `RESULT {"tokens": [[ids] per job], "stats": {...}}`.
"""

from __future__ import annotations

import asyncio
import json
import sys


async def run(spec: dict) -> dict:
    from pd_runtime.engine.async_engine import AsyncEngine, EngineArgs
    from pd_runtime.engine.sampling import SamplingParams

    eng = await AsyncEngine.start(EngineArgs(**spec["args"]))
    try:
        async def one(i: int, job: dict) -> list[int]:
            toks: list[int] = []
            params = SamplingParams(max_tokens=job["max_tokens"], temperature=0)
            async for o in eng.generate(f"j{i}", job["prompt"], params, job["kv"]):
                toks += o.token_ids
            return toks

        tokens = await asyncio.gather(*(one(i, j) for i, j in enumerate(spec["jobs"])))
        return {"tokens": tokens, "stats": eng.stats()}
    finally:
        await eng.shutdown()


def main() -> int:
    spec = json.loads(sys.stdin.read())
    out = asyncio.run(asyncio.wait_for(run(spec), 300))
    print("RESULT " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
