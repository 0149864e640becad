"""The bundled engine (engine.type: builtin): models over the transfer engine's paged KV arena
(config, checkpoint, kv, model, ssm, runner, generate), tokenizers and GGUF loading, the
continuous-batching scheduler, P/D hand-over and TP workers. Imports nothing on its own: each
module pulls torch when imported."""
