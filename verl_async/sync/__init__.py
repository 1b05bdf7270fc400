"""Weight transfer trainer -> running vLLM engines through vLLM's native weight-transfer API."""
