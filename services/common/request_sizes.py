"""The size of a request assumed before any has been measured: the placement policies' pricing of a
model whose reports have no finished requests yet (PolicyParams.default_prompt_tokens / _output_tokens)
and the agent's room check for an engine that has finished none (make_room.arriving_tokens). One place,
so that the scheduler and the agents assume the same request."""

DEFAULT_PROMPT_TOKENS = 512
DEFAULT_OUTPUT_TOKENS = 128
