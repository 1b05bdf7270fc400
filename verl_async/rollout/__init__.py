"""vLLM rollout servers (one AsyncLLM engine per Ray actor) and the manager that fronts them."""
