"""A prefill engine in its own process (for tests/runtime/test_engine_pd.py).

Reads one JSON line from stdin: {"model": dir, "token": str, "prompts": [[ids]], "lease_s": s}.
Prefills every prompt as a do_remote_decode request, prints one line `RESULT <json>` with the
kv_transfer_params per prompt, then keeps serving (steps, so released blocks are freed) until
stdin closes or it is killed; then prints `RESULT {"held": n}` once nothing is held, or after
10 s.
"""

from __future__ import annotations

import json
import sys
import threading
import time


def main() -> int:
    from pd_runtime.engine.checkpoint import load_checkpoint
    from pd_runtime.engine.core import engine_from_checkpoint, rank_spec_for
    from pd_runtime.engine.pd import engine_factors, make_prefill_side
    from pd_runtime.engine.sampling import SamplingParams

    job = json.loads(sys.stdin.readline())
    ckpt = load_checkpoint(job["model"])
    spec = rank_spec_for(ckpt.config, block_size=16, layout="HND", num_blocks=64)
    eng = engine_from_checkpoint(ckpt, spec, seed=0)
    assert eng.arena is not None
    eng.prefill = make_prefill_side(spec, engine_factors(ckpt.config, "tiny"), job["token"],
                                    eng.arena, lease_s=job.get("lease_s", 30.0))
    router = {"do_remote_decode": True, "do_remote_prefill": False}
    for i, p in enumerate(job["prompts"]):
        eng.add_request(f"q{i}", p, SamplingParams(max_tokens=1, min_tokens=1, temperature=0),
                        dict(router))
    kv = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                kv[o.request_id] = o.kv_transfer_params
    print("RESULT " + json.dumps(kv), flush=True)
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    while not done.is_set():
        eng.step()
        time.sleep(0.01)
    # D's release notification of its last pull may still be on its way (or waiting for this
    # process's poller on a loaded machine): what is still held after 10 s is what leaked
    end = time.monotonic() + 10.0
    while eng.held and time.monotonic() < end:
        eng.step()
        time.sleep(0.01)
    print("RESULT " + json.dumps({"held": len(eng.held)}), flush=True)
    eng.prefill.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
